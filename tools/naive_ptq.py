#!/usr/bin/env python3
"""Naive post-training INT8 quantization baseline for the shipped model zoo.

Standalone: needs only numpy, onnx and onnxruntime (no torch, no onnxrep).

For every model it runs onnxruntime.quantization.quantize_static with
QuantFormat.QDQ, CalibrationMethod.MinMax, activation_type=QUInt8,
weight_type=QInt8 -- once with per_channel=False ("naive per-tensor") and once
with per_channel=True -- calibrated on the 512 images of models/fmnist_calib.npz,
and evaluates FP32 and INT8 top-1 on the FULL Fashion-MNIST test set (10k images,
parsed from the raw gz IDX files). Quantized models are written to a temporary
directory only. Prints a markdown table on stdout (progress goes to stderr).

    python tools/naive_ptq.py
    python tools/naive_ptq.py --models models/mobileone_fmnist.onnx --json /tmp/ptq.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO / "models" / "repvgg_fmnist.onnx", REPO / "models" / "mobileone_fmnist.onnx"]
DEFAULT_DATA_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    assert data[0] == 0 and data[1] == 0 and data[2] == 0x08, f"{path}: expected uint8 IDX"
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_test_set(data_dir: Path, scale: float, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(data_dir / "t10k-images-idx3-ubyte.gz")[:, None].astype(np.float32)
    y = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    x = (x * np.float32(scale) - np.float32(mean)) / np.float32(std)
    return x, y


class NpzCalibrationReader(CalibrationDataReader):
    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = 64):
        self.input_name, self.data, self.batch_size = input_name, data, batch_size
        self.rewind()

    def get_next(self):
        if self.pos >= len(self.data):
            return None
        batch = self.data[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self):
        self.pos = 0


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def top1(path: Path, x: np.ndarray, y: np.ndarray, threads: int, bs: int = 500) -> float:
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + bs]})[0].argmax(1) for i in range(0, len(x), bs)])
    return float((pred == y).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path, default=DEFAULT_MODELS)
    p.add_argument("--calib", type=Path, default=REPO / "models" / "fmnist_calib.npz")
    p.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    with np.load(args.calib) as z:
        calib = z["input"].astype(np.float32)
        fmt = str(z["input_format"]) if "input_format" in z.files else "float32_preprocessed"
        scale, mean, std = (float(z[k]) for k in ("preprocess_scale", "preprocess_mean", "preprocess_std"))
    if fmt != "float32_preprocessed":
        raise SystemExit(f"{args.calib}: expected float32_preprocessed calibration data, got {fmt}")
    x_test, y_test = load_test_set(args.data_dir, scale, mean, std)
    log(f"calibration {calib.shape} from {args.calib}; test set {x_test.shape}")

    results = []
    with tempfile.TemporaryDirectory(prefix="naive_ptq_") as tmp:
        for model_path in args.models:
            onnx.checker.check_model(str(model_path))
            input_name = onnx.load(str(model_path)).graph.input[0].name
            row = {"model": model_path.name, "fp32_top1": top1(model_path, x_test, y_test, args.threads)}
            log(f"{model_path.name}: FP32 top-1 {row['fp32_top1']:.4f}")
            for per_channel in (False, True):
                tag = "per_channel" if per_channel else "per_tensor"
                qpath = Path(tmp) / f"{model_path.stem}.{tag}.int8.onnx"
                t0 = time.time()
                quantize_static(
                    str(model_path), str(qpath), NpzCalibrationReader(input_name, calib),
                    quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                )
                acc = top1(qpath, x_test, y_test, args.threads)
                row[f"{tag}_top1"] = acc
                row[f"{tag}_drop_pp"] = 100.0 * (row["fp32_top1"] - acc)
                log(f"{model_path.name}: INT8 {tag} top-1 {acc:.4f} "
                    f"(drop {row[f'{tag}_drop_pp']:.2f} pp, {time.time() - t0:.1f}s)")
            results.append(row)

    print("| model | FP32 top-1 | naive per-tensor INT8 top-1 | drop (pp) | per-channel INT8 top-1 | drop (pp) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['fp32_top1']:.4f} | {r['per_tensor_top1']:.4f} | {r['per_tensor_drop_pp']:.2f} "
              f"| {r['per_channel_top1']:.4f} | {r['per_channel_drop_pp']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"test_set": "Fashion-MNIST t10k (10000)", "calib": str(args.calib),
                                         "onnxruntime": ort.__version__, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
