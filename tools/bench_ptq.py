"""PTQ accuracy on the FULL Fashion-MNIST test set: onnxruntime alone vs onnxrep.

For each shipped model: top-1 of FP32, of onnxruntime alone (its documented flow: quant_pre_process
then quantize_static, QDQ, uint8 activations, int8 weights, MinMax) per-tensor and per-channel,
and of `onnxrep quantize` per-tensor and per-channel, all calibrated on models/fmnist_calib.npz.
Each quantization runs in a child process, which reports its wall time and peak memory
(ru_maxrss). The 10k test images are parsed from the raw IDX files and preprocessed with the
scale/mean/std recorded in models/fmnist_eval.npz.

The ablation table adds onnxrep's pieces one at a time (per-tensor INT8 top-1): no passes, CLE
alone, + dead-input cleanup (before CLE), + high-bias absorption (after CLE), + bias correction.

usage: python tools/bench_ptq.py [--models mobileone_fmnist repvgg_fmnist] [--no-ablation]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FMNIST = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CALIB = MODELS / "fmnist_calib.npz"
VARIANTS = ("ort-tensor", "ort-channel", "onnxrep-tensor", "onnxrep-channel")
TITLES = {"ort-tensor": "onnxruntime alone per-tensor", "ort-channel":
          "onnxruntime alone per-channel", "onnxrep-tensor": "onnxrep per-tensor",
          "onnxrep-channel": "onnxrep per-channel"}


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (big-endian header: zero, zero, dtype code, rank, dims)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0C: ">i4", 0x0D: ">f4"}[data[2]]
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype, offset=4 + 4 * rank).reshape(dims)


def test_set() -> dict:
    """{input: float32 [10000, 1, 28, 28], labels} with the recorded preprocessing."""
    pp = np.load(MODELS / "fmnist_eval.npz")
    u8 = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:, None]
    x = (u8.astype(np.float32) * pp["preprocess_scale"] - pp["preprocess_mean"]) \
        / pp["preprocess_std"]
    return {"input": x.astype(np.float32),
            "labels": read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)}


# ---- child: one quantization, timed, peak memory ----------------------------------------------

def child(variant: str, src: str, dst: str) -> None:
    start = time.perf_counter()
    per_channel = variant.endswith("channel")
    if variant.startswith("ort"):
        _ort_alone(src, dst, per_channel)
    else:
        from onnxrep.ir.model import load, save
        from onnxrep.ptq.quantizer import QuantizeConfig, quantize

        save(quantize(load(src), str(CALIB), QuantizeConfig(per_channel=per_channel)), dst)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_mb}))


def _ort_alone(src: str, dst: str, per_channel: bool) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = np.load(CALIB)["input"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(x[i:i + 32] for i in range(0, len(x), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # quant_pre_process may leave temp files in the working directory
        pre = str(Path(tmp) / "pre.onnx")
        quant_pre_process(src, pre)
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def run_child(variant: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", variant, str(src), str(dst)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- parent ------------------------------------------------------------------------------------

def top1(model, data: dict) -> float:
    from onnxrep.evaluation import evaluate

    return 100 * evaluate(model, data, batch_size=250).top1


def ablation(src: Path, data: dict) -> list[tuple[str, float | str]]:
    from onnxrep.ptq.quantizer import QuantizeConfig, quantize

    model = onnx.load(str(src))
    rows = [("no passes (onnxrep prepare + onnxruntime)",
             top1(quantize(model, str(CALIB), QuantizeConfig(optimize=False,
                                                               bias_correction=False)), data))]
    try:
        from onnxrep.analysis.statistics import collect_statistics
        from onnxrep.passes.absorb_bias import AbsorbHighBias
        from onnxrep.passes.dead_inputs import ZeroDeadInputs
    except ImportError as exc:
        collect_statistics = None
        why = f"not present ({exc.name})"
    from onnxrep.passes.equalize import EqualizeCrossLayer

    def quant(m, bias=False):
        return top1(quantize(m, str(CALIB), QuantizeConfig(optimize=False,
                                                            bias_correction=bias)), data)

    cle = _copy(model)
    EqualizeCrossLayer()(cle)
    rows.append(("CLE alone", quant(cle)))
    if collect_statistics is None:
        rows += [("+ dead-input cleanup", why), ("+ absorption", why)]
        rows.append(("+ bias correction (on CLE)", quant(cle, bias=True)))
        return rows
    dead = _copy(model)
    ZeroDeadInputs(collect_statistics(dead, str(CALIB)))(dead)
    EqualizeCrossLayer()(dead)
    rows.append(("+ dead-input cleanup", quant(dead)))
    absorbed = _copy(dead)
    AbsorbHighBias(collect_statistics(absorbed, str(CALIB)))(absorbed)
    rows.append(("+ absorption", quant(absorbed)))
    rows.append(("+ bias correction", quant(absorbed, bias=True)))
    return rows


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobileone_fmnist", "repvgg_fmnist"])
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "SRC", "DST"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    paths = [MODELS / f"{m}.onnx" for m in args.models]
    missing = [str(x) for x in [*paths, CALIB, MODELS / "fmnist_eval.npz"] if not x.exists()]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    data = test_set()
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxrep-bench-") as tmp:
        for path in paths:
            row = {"fp32": top1(onnx.load(str(path)), data)}
            for variant in VARIANTS:
                dst = Path(tmp) / f"{path.stem}.{variant}.onnx"
                info = run_child(variant, path, dst)
                if "error" not in info:
                    info["top1"] = top1(onnx.load(str(dst)), data)
                row[variant] = info
            results[path.stem] = row
    n = len(data["labels"])
    print(f"Top-1 (%) on the full Fashion-MNIST test set ({n} images); in parentheses the "
          "change vs FP32 in points. Calibration: models/fmnist_calib.npz (512 images).\n")
    print("| model | FP32 | " + " | ".join(TITLES[v] for v in VARIANTS) + " |")
    print("|---|---:|" + "---:|" * len(VARIANTS))
    for model, row in results.items():
        cells = [_cell(row[v], row["fp32"]) for v in VARIANTS]
        print(f"| {model} | {row['fp32']:.2f} | " + " | ".join(cells) + " |")
    print("\nQuantize time (s) and peak memory (MB, child process maxrss):\n")
    print("| model | " + " | ".join(TITLES[v] for v in VARIANTS) + " |")
    print("|---|" + "---:|" * len(VARIANTS))
    for model, row in results.items():
        cells = ["failed" if "error" in row[v] else
                 f"{row[v]['seconds']:.1f} s, {row[v]['peak_mb']:.0f} MB" for v in VARIANTS]
        print(f"| {model} | " + " | ".join(cells) + " |")
    for model, row in results.items():
        for v in VARIANTS:
            if "error" in row[v]:
                print(f"\n{model} {TITLES[v]} failed: {row[v]['error']}")
    if args.ablation:
        print("\nAblation, per-tensor INT8 top-1 (%) on the full test set, passes added in "
              "order:\n")
        print("| step | " + " | ".join(results) + " |")
        print("|---|" + "---:|" * len(results))
        steps = {model: ablation(MODELS / f"{model}.onnx", data) for model in results}
        for k, (name, _) in enumerate(next(iter(steps.values()))):
            cells = [_value(steps[m][k][1], results[m]["fp32"]) for m in results]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("| FP32 | " + " | ".join(f"{results[m]['fp32']:.2f}" for m in results) + " |")
    return 0


def _cell(info: dict, fp32: float) -> str:
    return "failed" if "error" in info else _value(info["top1"], fp32)


def _value(v, fp32: float) -> str:
    return v if isinstance(v, str) else f"{v:.2f} ({v - fp32:+.2f})"


if __name__ == "__main__":
    sys.exit(main())
