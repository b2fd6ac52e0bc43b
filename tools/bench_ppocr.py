"""PP-OCRv4 text detector (a real pretrained Rep model): onnxrep vs onnxruntime alone.

Renders deterministic text images with PIL and the Debian DejaVu fonts (calibration and test sets
from different seeds), then on the detector fetched by tools/fetch_ppocr.py:
1. `onnxrep optimize` (--input-shape for the symbolic dims) and its equivalence on the test
   images (probability-map SQNR and max |difference| vs the original);
2. INT8 QDQ per-tensor and per-channel by onnxruntime alone (quant_pre_process, then
   quantize_static with its defaults: QDQ, uint8 activations, int8 weights, MinMax) and by
   `onnxrep quantize`;
and prints a markdown table of probability-map SQNR vs FP32 (dB, over all test pixels), the
share of pixels on the same side of the 0.3 text threshold PP-OCR uses, and latency. onnxrep runs
with its defaults (bias correction on, over --analysis images), without bias correction, with
percentile calibration, and per-tensor keeping the 8 most sensitive convs in FP32
(--exclude auto:8).

usage: python tools/bench_ppocr.py [--calib 24] [--test 12] [--size 480x640] [--analysis 4]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch_ppocr import fetch  # noqa: E402

FONTS = Path("/usr/share/fonts/truetype/dejavu")
WORDS = ("invoice total amount date receipt quantity price tax order number customer "
         "address phone email shipping payment balance due account reference item "
         "description unit discount subtotal ONNX INT8 Rep quantize model 2024 0042 12.50 "
         "Zürich Straße naïve café résumé").split()
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
THRESHOLD = 0.3  # PP-OCR's DB binarization threshold


def render(seed: int, size: tuple[int, int]) -> np.ndarray:
    """One RGB uint8 image [H, W, 3]: lines of words in random DejaVu fonts, sizes and colours
    on a noisy gradient background, a few shapes as distractors."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    h, w = size
    top, bottom = rng.integers(150, 256, 3), rng.integers(120, 256, 3)
    ramp = np.linspace(0, 1, h)[:, None, None]
    bg = (top * (1 - ramp) + bottom * ramp).repeat(w, axis=1)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fonts = sorted(FONTS.glob("DejaVu*.ttf"))
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = [x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))]
        draw.rectangle(box, outline=tuple(int(v) for v in rng.integers(0, 200, 3)), width=2)
    y = int(rng.integers(4, 30))
    while y < h - 20:
        px = int(rng.integers(14, 44))
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), px)
        text = " ".join(rng.choice(WORDS, int(rng.integers(1, 6))))
        colour = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((int(rng.integers(4, max(5, w // 3))), y), text, font=font, fill=colour)
        y += px + int(rng.integers(8, 40))
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def preprocess(images: list[np.ndarray]) -> np.ndarray:
    """PaddleOCR's detector input: BGR, x / 255 normalized by ImageNet mean/std, NCHW."""
    x = np.stack(images)[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


def probs(model, x: np.ndarray, optimized: bool = True) -> tuple[np.ndarray, float]:
    from onnxrep import verify

    sess = verify.session(model, optimized=optimized)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:1]})  # warm-up
    start = time.perf_counter()
    out = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return out, (time.perf_counter() - start) / len(x)


def sqnr(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = ref.astype(np.float64), cand.astype(np.float64)
    noise = float(np.sum((ref - cand) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)


def ort_alone(src: Path, calib: np.ndarray, out: Path, per_channel: bool) -> str | None:
    """onnxruntime's documented flow; returns why it failed, or None."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    pre = out.with_suffix(".pre.onnx")
    cwd = os.getcwd()
    try:
        os.chdir(out.parent)  # its shape inference may leave temp files in the working directory
        # symbolic shape inference fails on the detector's dynamic dims ("Incomplete symbolic
        # shape inference"), so it is skipped; ONNX shape inference and the optimizer still run
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=per_channel)
        onnx.checker.check_model(str(out))
        import onnxruntime as ort

        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    except Exception as exc:  # report, do not hide: this is the baseline's failure
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
    finally:
        os.chdir(cwd)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", type=int, default=24, help="calibration images (default 24)")
    p.add_argument("--test", type=int, default=12, help="test images (default 12)")
    p.add_argument("--size", default="480x640", help="HxW, multiples of 32 (default 480x640)")
    p.add_argument("--analysis", type=int, default=4,
                   help="--analysis-samples for onnxrep quantize: images used by bias "
                        "correction, one model run per corrected layer (default 4)")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    src = fetch()
    calib = preprocess([render(1000 + i, (h, w)) for i in range(args.calib)])
    test = preprocess([render(9000 + i, (h, w)) for i in range(args.test)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxrep-ppocr-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", x=calib)
        ref, fp32_ms = probs(str(src), test)
        rows.append(("FP32 (original)", ref, fp32_ms, None))
        opt = tmp / "det.opt.onnx"
        shape = f"x:1x3x{h}x{w}"
        command = ["optimize", str(src), "-o", str(opt), "--input-shape", shape]
        optimize = _onnxrep(command)
        if optimize.returncode != 0:
            rows.append(("onnxrep optimize (FP32)", None, None, _last_line(optimize)))
            optimize = _onnxrep(command + ["--rtol", "1e-2"])
        label = "onnxrep optimize (FP32)" if len(rows) == 1 else "same, --rtol 1e-2"
        if optimize.returncode == 0:
            rows.append((label, *probs(str(opt), test), None))
        else:
            rows.append((label, None, None, _last_line(optimize)))
        for per_channel in (False, True):
            mode = "per-channel" if per_channel else "per-tensor"
            q = tmp / f"ort.{mode}.onnx"
            why = ort_alone(src, calib, q, per_channel)
            rows.append((f"onnxruntime alone, {mode}", *(probs(str(q), test) if why is None
                                                          else (None, None)), why))
            variants = [[], ["--no-bias-correction"]]
            variants.append(["--method", "percentile"])
            if not per_channel:
                variants.append(["--exclude", "auto:8"])
            for extra in variants:
                q = tmp / f"onnxrep.{mode}.onnx"
                cmd = ["quantize", str(src), "--calib", str(tmp / "calib.npz"), "-o", str(q),
                       "--force", "--batch-size", "1", "--input-shape", shape,
                       "--analysis-samples", str(args.analysis), *extra]
                start = time.perf_counter()
                done = _onnxrep(cmd + (["--per-channel"] if per_channel else []))
                took = time.perf_counter() - start
                label = f"onnxrep quantize, {mode}{', ' + ' '.join(extra) if extra else ''} " \
                        f"({took:.0f} s)"
                rows.append((label, *(probs(str(q), test) if done.returncode == 0
                                      else (None, None)),
                             None if done.returncode == 0 else _last_line(done)))
    print(f"PP-OCRv4 det ({src.name}), {args.test} rendered test images {h}x{w}, "
          f"{args.calib} calibration images; SQNR of the probability map vs FP32; "
          f"'agree' = pixels on the same side of the {THRESHOLD} threshold; latency per "
          "image, batch 1, onnxruntime CPU, graph optimizations on\n")
    print("| model | prob-map SQNR dB | max abs diff | agree % | ms/image |")
    print("|---|---:|---:|---:|---:|")
    for name, out, ms, why in rows:
        if out is None:
            print(f"| {name} | failed: {why} | | | |")
            continue
        agree = 100 * np.mean((out > THRESHOLD) == (ref > THRESHOLD))
        print(f"| {name} | {sqnr(ref, out):.1f} | {np.abs(out - ref).max():.2e} | "
              f"{agree:.3f} | {1000 * ms:.1f} |")
    return 0


def _onnxrep(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxrep", *args, "-q"], capture_output=True,
                          text=True)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


if __name__ == "__main__":
    sys.exit(main())
