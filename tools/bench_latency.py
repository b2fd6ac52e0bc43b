"""INT8 (onnxrep quantize) vs FP32 latency in onnxruntime, graph optimizations on.

For each model: quantize per-tensor with the default settings on the calibration data, then time
FP32 and INT8 at batch 1 and 32 in one process, calls alternating between the two models (so a
busy neighbour on the shared machine slows both alike); the median per call is reported.
Also lists the op types onnxruntime actually runs after its graph optimizations, to show that
Conv(+ReLU) became integer QLinearConv with no float op left between.

--sweep measures instead how fast INT8 can get on this CPU at batch 32, without the shipped
models: the CPU flags onnxruntime's int8 kernels depend on (VNNI); the throughput of one
MatMulInteger (int8 GEMM) against one MatMul (fp32 GEMM), M = K = N = 1024; synthetic RepVGG deploy
chains (7 conv3x3+ReLU with the shipped RepVGG's strides, GAP, Gemm; seeded random weights) at
its widths 16..96 times 1, 2, 4 and 8 and at larger inputs, quantized with onnxrep's defaults;
and, on the 64..384 chain, other quantization formats and an FP32 baseline without onnxruntime's
NCHWc conv kernels. Calibration: the first 64 rows of --calib's `input` (nearest-upsampled for
larger inputs; latency does not depend on the calibrated ranges), random N(0, 1) when the file
is missing. Calls per row fit a time budget; the sweep takes 1-2 minutes.

Sessions do not spin-wait (see ``session``), in both modes.

usage: python tools/bench_latency.py [MODEL ...] [--calib models/fmnist_calib.npz]
       [--calls 400] [--threads 0] [--sweep]
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = [ROOT / "models" / "mobileone_fmnist.onnx", ROOT / "models" / "repvgg_fmnist.onnx"]
# the shipped RepVGG's deploy convs (models/repvgg.py): output widths and strides
CHAIN_WIDTHS = (16, 16, 32, 32, 64, 64, 96)
CHAIN_STRIDES = (1, 2, 2, 1, 2, 1, 1)
SWEEP = ((1, 28), (2, 28), (4, 28), (8, 28), (2, 56), (1, 112))  # (width multiplier, input size)
VARIANT_SCALE = 4
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
GEMM_SIZE = 1024
GEMM_TYPES = (("MatMul, fp32", np.float32, np.float32),
              ("MatMulInteger, uint8 x int8", np.uint8, np.int8),
              ("MatMulInteger, uint8 x uint8", np.uint8, np.uint8),
              ("MatMulInteger, int8 x int8", np.int8, np.int8))
ROW_SECONDS = 4.0  # timing budget per sweep table row
BATCH = 32


def session(model: onnx.ModelProto, threads: int, optimized_path: Path | None = None,
            level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    """A CPU session without spin-waiting: with onnxruntime's default spinning, an idle
    session's threads spin on the core the next alternating call needs (both models ran ~2x
    slower at 2 threads with a busy neighbour)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def runs(sessions: dict, feeds: dict) -> dict[str, Callable[[], object]]:
    """One call of each session on ``feeds``."""
    return {key: functools.partial(sess.run, None, feeds) for key, sess in sessions.items()}


def interleaved(calls_of: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median seconds per call of each of ``calls_of``, calls alternating between them (a
    busy neighbour on the shared machine slows all of them alike)."""
    times = {k: [] for k in calls_of}
    for _ in range(calls):
        for key, call in calls_of.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def runtime_ops(model: onnx.ModelProto, threads: int) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, threads, path)
        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def budget_calls(calls_of: dict[str, Callable[[], object]], most: int) -> int:
    """Alternating rounds of ``calls_of`` that fit ROW_SECONDS (5 to ``most``), timed on one
    warm-up round."""
    start = time.perf_counter()
    for call in calls_of.values():
        call()
    return max(5, min(most, int(ROW_SECONDS / (time.perf_counter() - start))))


def cpu_flags() -> str:
    """'flag yes/no' for CPU_FLAGS, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags: /proc/cpuinfo unreadable"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "unknown CPU")
    return f"{model}: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


def gemm_model(a_type, b_type) -> onnx.ModelProto:
    """One MatMul (float) or MatMulInteger of a GEMM_SIZE square input by a constant."""
    floating = a_type is np.float32
    b = np.random.default_rng(0).integers(-100, 100, (GEMM_SIZE, GEMM_SIZE)).astype(b_type)
    node = helper.make_node("MatMul" if floating else "MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node], "gemm",
        [helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(np.dtype(a_type)),
                                       [GEMM_SIZE, GEMM_SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT if floating else TensorProto.INT32,
                                       None)],
        [numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def gemm_table(threads: int, calls: int) -> None:
    """Int8 vs fp32 GEMM throughput of single ops, calls alternating."""
    rng = np.random.default_rng(0)
    calls_of = {label: functools.partial(
        session(gemm_model(a, b), threads).run, None,
        {"a": rng.integers(0, 100, (GEMM_SIZE, GEMM_SIZE)).astype(a)})
        for label, a, b in GEMM_TYPES}
    median = interleaved(calls_of, budget_calls(calls_of, calls))
    fp32 = median[GEMM_TYPES[0][0]]
    print(f"| GEMM op, M = K = N = {GEMM_SIZE} | ms | GOP/s | vs fp32 |")
    print("|---|---:|---:|---:|")
    for label, sec in median.items():
        print(f"| {label} | {1000 * sec:.2f} | {2 * GEMM_SIZE ** 3 / sec / 1e9:.1f} | "
              f"{fp32 / sec:.2f}x |")


def rep_chain(scale: int, size: int, seed: int = 0) -> onnx.ModelProto:
    """RepVGG deploy chain: CHAIN_WIDTHS x ``scale`` conv3x3+ReLU on a 1 x ``size`` x ``size``
    input, GAP, Gemm to 10; seeded He-normal weights."""
    rng = np.random.default_rng(seed)
    nodes, weights, x, cin = [], [], "input", 1
    for i, (width, stride) in enumerate(zip(CHAIN_WIDTHS, CHAIN_STRIDES)):
        cout = width * scale
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))
        weights += [numpy_helper.from_array(w.astype(np.float32), f"conv{i}.w"),
                    numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32),
                                            f"conv{i}.b")]
        nodes += [helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], [f"conv{i}"],
                                   f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                   strides=[stride, stride]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], f"relu{i}")]
        x, cin = f"relu{i}", cout
    fc = rng.standard_normal((10, cin)) / np.sqrt(cin)
    weights += [numpy_helper.from_array(fc.astype(np.float32), "fc.w"),
                numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], "gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], "flat"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], "fc", transB=1)]
    graph = helper.make_graph(
        nodes, "rep_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def sweep_data(calib: Path, size: int, rows: int = 64) -> np.ndarray:
    """``rows`` calibration images at ``size`` x ``size``: --calib's ``input`` upsampled by
    repetition, or random N(0, 1) when the file is missing."""
    if not calib.exists():
        return np.random.default_rng(0).standard_normal((rows, 1, size, size), np.float32)
    x = np.load(calib)["input"][:rows]
    factor = size // x.shape[-1]
    return x.repeat(factor, axis=2).repeat(factor, axis=3)


def widths(scale: int) -> str:
    return f"{CHAIN_WIDTHS[0] * scale}..{CHAIN_WIDTHS[-1] * scale}"


def chain_table(calib: Path, threads: int, calls: int) -> None:
    """FP32 vs onnxrep's default INT8 of rep_chain at each SWEEP point, batch 32."""
    from onnxrep.ptq.quantizer import quantize

    print("| RepVGG chain widths | input | GMAC / image | FP32 ms | INT8 ms | INT8 speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for scale, size in SWEEP:
        fp32, data = rep_chain(scale, size), sweep_data(calib, size)
        sessions = {"fp32": session(fp32, threads),
                    "int8": session(quantize(fp32, {"input": data}), threads)}
        calls_of = runs(sessions, {"input": batch_of(data)})
        median = interleaved(calls_of, budget_calls(calls_of, calls))
        f, q = median["fp32"], median["int8"]
        print(f"| {widths(scale)} | {size}x{size} | {chain_macs(scale, size) / 1e9:.3f} | "
              f"{1000 * f:.1f} | {1000 * q:.1f} | {f / q:.2f}x |", flush=True)


def chain_macs(scale: int, size: int) -> int:
    """Multiply-accumulates of one image through rep_chain's convs."""
    macs, cin = 0, 1
    for width, stride in zip(CHAIN_WIDTHS, CHAIN_STRIDES):
        size = (size - 1) // stride + 1
        macs += size * size * width * scale * cin * 9
        cin = width * scale
    return macs


def batch_of(data: np.ndarray) -> np.ndarray:
    return data[np.random.default_rng(0).integers(0, len(data), BATCH)]


def ort_qoperator(model: onnx.ModelProto, data: np.ndarray, **options) -> onnx.ModelProto:
    """onnxruntime's own quantize_static in QOperator format, int8 weights, uint8 activations
    unless ``options`` say otherwise."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from onnxrep.ptq.quantizer import _ListReader, quiet_onnxruntime

    reader = _ListReader([{"input": data[i:i + BATCH]} for i in range(0, len(data), BATCH)])
    with tempfile.TemporaryDirectory() as tmp, quiet_onnxruntime():
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        quantize_static(str(src), str(out), reader, **{
            "quant_format": QuantFormat.QOperator, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, **options})
        return onnx.load(str(out))


def variant_table(calib: Path, threads: int, calls: int) -> None:
    """Other INT8 formats and a weaker FP32 baseline on one chain, all calls alternating."""
    from onnxruntime.quantization import QuantType

    from onnxrep.ptq.quantizer import QuantizeConfig, quantize

    fp32, data = rep_chain(VARIANT_SCALE, 28), sweep_data(calib, 28)
    onnxrep = functools.partial(quantize, fp32, {"input": data})
    ort_qop = functools.partial(ort_qoperator, fp32, data)
    int8 = {
        "onnxrep QDQ per-tensor (default)": onnxrep(),
        "onnxrep QDQ per-channel": onnxrep(QuantizeConfig(per_channel=True)),
        "onnxrep QDQ uint8 weights": onnxrep(QuantizeConfig(weight_type="uint8")),
        "onnxruntime QOperator": ort_qop(),
        "onnxruntime QOperator, reduce_range, per-channel": ort_qop(reduce_range=True,
                                                                    per_channel=True),
        "onnxruntime QOperator, int8 activations (its default)": ort_qop(
            activation_type=QuantType.QInt8),
    }
    baseline = "FP32, ORT_ENABLE_ALL (baseline)"
    sessions = {baseline: session(fp32, threads),
                "FP32, ORT_ENABLE_EXTENDED (no NCHWc conv)": session(
                    fp32, threads, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
                **{label: session(model, threads) for label, model in int8.items()}}
    calls_of = runs(sessions, {"input": batch_of(data)})
    median = interleaved(calls_of, budget_calls(calls_of, calls))
    print(f"| widths {widths(VARIANT_SCALE)}, 28x28, batch {BATCH} | ms | speed-up vs baseline |")
    print("|---|---:|---:|")
    for label, sec in median.items():
        print(f"| {label} | {1000 * sec:.1f} | {median[baseline] / sec:.2f}x |")


def sweep(args) -> int:
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra-op threads "
          f"{args.threads or 'default'}, no spinning; median per call, calls alternating\n")
    print(cpu_flags() + "\n")
    gemm_table(args.threads, args.calls // 4)
    print()
    chain_table(args.calib, args.threads, args.calls // 4)
    print()
    variant_table(args.calib, args.threads, args.calls // 4)
    return 0


def main(argv=None) -> int:
    from onnxrep.ptq.quantizer import quantize

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, default=MODELS)
    p.add_argument("--calib", type=Path, default=ROOT / "models" / "fmnist_calib.npz")
    p.add_argument("--calls", type=int, default=400,
                   help="timed calls per model at batch 1 (a quarter at batch 32)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime)")
    p.add_argument("--sweep", action="store_true",
                   help="int8 ceiling on this CPU: GEMM ops, synthetic chains, formats")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args)
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
            median = interleaved(runs(sessions, feeds),
                                 args.calls if batch == 1 else args.calls // 4)
            f, q = median["fp32"], median["int8"]
            rows.append((path.stem, batch, 1000 * f, 1000 * q, f / q))
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, graph optimizations ON, "
          f"intra-op threads {args.threads or 'default'}, no spinning; median per call, "
          "FP32 and INT8 calls alternating\n")
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
