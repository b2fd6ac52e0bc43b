"""Fetch PP-OCRv4's text detector (a real pretrained Rep model) into a cache outside git.

The model ships inside the PyPI wheel rapidocr-onnxruntime==1.4.4 as
rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx (PP-LCNetV3 backbone with merged rep
layers, weights in Constant nodes, HardSwish, SE blocks, ConvTranspose, a Sigmoid map).
`pip download --no-deps` gets the wheel; only the model file is kept, checked by SHA-256.

usage: python tools/fetch_ppocr.py [--cache-dir DIR]     (prints the model path)
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

WHEEL = "rapidocr-onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
DEFAULT_CACHE = Path(os.environ.get("ONNXREP_CACHE", Path.home() / ".cache" / "onnxrep"))


def fetch(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Path of the cached detector, downloading the wheel once."""
    target = cache_dir / "ppocr" / Path(MEMBER).name
    if target.exists() and _sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxrep-ppocr-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{WHEEL}: {MEMBER} has SHA-256 {digest}, expected {SHA256}")
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    print(fetch(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
