"""INT8 (onnxrep quantize) vs FP32 latency in onnxruntime, graph optimizations on.

For each model: quantize per-tensor with the default settings on the calibration data, then time
FP32 and INT8 at batch 1 and 32 in one process, calls alternating between the two models (so a
busy neighbour on the shared machine slows both alike); the median per call is reported.
Also lists the op types onnxruntime actually runs after its graph optimizations, to show that
Conv(+ReLU) became integer QLinearConv with no float op left between.

usage: python tools/bench_latency.py [MODEL ...] [--calib models/fmnist_calib.npz]
       [--calls 400] [--threads 0]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODELS = [ROOT / "models" / "mobileone_fmnist.onnx", ROOT / "models" / "repvgg_fmnist.onnx"]


def session(model: onnx.ModelProto, threads: int, optimized_path: Path | None = None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, feeds: dict, calls: int) -> dict[str, float]:
    """Median seconds per call of each session, calls alternating between the sessions (a
    busy neighbour on the shared machine slows all of them alike)."""
    times = {k: [] for k in sessions}
    for _ in range(calls):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def runtime_ops(model: onnx.ModelProto, threads: int) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, threads, path)
        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def main(argv=None) -> int:
    from onnxrep.quantize import quantize

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, default=MODELS)
    p.add_argument("--calib", type=Path, default=ROOT / "models" / "fmnist_calib.npz")
    p.add_argument("--calls", type=int, default=400,
                   help="timed calls per model at batch 1 (a quarter at batch 32)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime)")
    args = p.parse_args(argv)
    missing = [m for m in [*args.models, args.calib] if not m.exists()]
    if missing:
        print(f"missing: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    calib = np.load(args.calib)["input"]
    rows, notes = [], []
    for path in args.models:
        fp32 = onnx.load(str(path))
        int8 = quantize(fp32, str(args.calib))
        ops = runtime_ops(int8, args.threads)
        notes.append(f"{path.name} INT8 runs: " + ", ".join(f"{k} x{v}" for k, v in
                                                             sorted(ops.items())))
        name = fp32.graph.input[0].name
        sessions = {"fp32": session(fp32, args.threads), "int8": session(int8, args.threads)}
        for batch in (1, 32):
            feeds = {name: calib[rng.integers(0, len(calib), batch)]}
            for s in sessions.values():
                s.run(None, feeds)  # warm-up
            median = interleaved(sessions, feeds, args.calls if batch == 1 else args.calls // 4)
            f, q = median["fp32"], median["int8"]
            rows.append((path.stem, batch, 1000 * f, 1000 * q, f / q))
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, graph optimizations ON, "
          f"intra-op threads {args.threads or 'default'}; median per call, FP32 and INT8 calls "
          "alternating\n")
    print("| model | batch | FP32 ms | INT8 ms | INT8 speed-up |")
    print("|---|---:|---:|---:|---:|")
    for model, batch, f, q, ratio in rows:
        print(f"| {model} | {batch} | {f:.3f} | {q:.3f} | {ratio:.2f}x |")
    print()
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
