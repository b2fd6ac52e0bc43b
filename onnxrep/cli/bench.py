"""Latency and throughput of a model, or of two side by side (e.g. FP32 vs INT8).

Both models run in one runtime (onnxruntime, or OpenVINO with `pip install
'onnxrep[openvino]'`) on the same seeded random inputs of the first model's input shapes:
the symbolic batch axis is set from --batch (several sizes allowed), other symbolic
dimensions need --input-shape. After a warm-up, each round times one call of each model,
alternating (the order flips every round), so a busy neighbour slows both alike. Per model:
median ms per call, the interquartile range and min-max over the rounds, samples/s (batch /
median); with two models the speed-up of the second (first median / second median). The
CPU's ISA flags (AVX2, AVX512F, AVX512_VNNI, AVX_VNNI, AMX) are printed with the table:
int8 speed depends on them, so compare ratios measured in one run, never numbers across
machines.

example: onnxrep bench models/repvgg_fmnist.onnx /tmp/repvgg.int8.onnx --batch 1 32
"""

from __future__ import annotations

import argparse

from onnxrep.bench import DEFAULT_BATCHES, DEFAULT_ROUNDS, BenchResult, bench
from onnxrep.cli.common import add_input_shape, add_reporting, emit_json, parse_input_shapes
from onnxrep.cpu import cpu_info
from onnxrep.errors import InputError
from onnxrep.progress import log
from onnxrep.report import table
from onnxrep.runtime import RUNTIMES


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model to time (e.g. the FP32 original)")
    p.add_argument("other", nargs="?", help="a second model, timed alternately (e.g. INT8)")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="where both models run (default onnxruntime)")
    p.add_argument("--batch", type=int, nargs="+", metavar="N",
                   help=f"batch sizes (default {' '.join(map(str, DEFAULT_BATCHES))}, or the "
                        "model's own when it fixes its batch dimension)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="intra-op threads (default 0: the runtime's default)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                   help=f"timed calls per model and batch size (default {DEFAULT_ROUNDS})")
    p.add_argument("--warmup", type=int, metavar="N",
                   help="untimed calls per model first (default max(3, rounds/10))")
    add_input_shape(p)
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise InputError(f"--rounds must be >= 1, not {args.rounds}")
    if args.threads < 0:
        raise InputError(f"--threads must be >= 0, not {args.threads}")
    if args.warmup is not None and args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, not {args.warmup}")
    batches = args.batch
    bad = [b for b in batches or [] if b < 1]
    if bad:
        raise InputError(f"--batch must be >= 1, not {bad[0]}")
    models = [args.model] + ([args.other] if args.other else [])
    shapes = parse_input_shapes(args.input_shape)
    log(f"timing {' vs '.join(models)} in {args.runtime}")
    result = bench(models, runtime=args.runtime, batches=batches, threads=args.threads,
                   rounds=args.rounds, warmup=args.warmup, shapes=shapes, labels=models)
    cpu = cpu_info()
    if args.json:
        emit_json("bench", {"runtime_version": runtime_version(args.runtime),
                            "cpu": cpu.as_dict(), **result.as_dict()})
        return 0
    print(header(result))
    print(f"CPU: {cpu.line()}")
    print()
    print(render(result))
    return 0


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    from onnxrep.runtime import import_openvino

    return import_openvino().__version__


def header(result: BenchResult) -> str:
    threads = result.threads or "default"
    return (f"{result.runtime} {runtime_version(result.runtime)}, intra-op threads {threads}, "
            f"{result.rounds} rounds after {result.warmup} warm-up calls, calls alternating; "
            "ms per call")


def render(result: BenchResult) -> str:
    """One row per batch and model; the speed-up column on the second model's row."""
    two = len(result.models) == 2
    headers = ["batch", "model", "median ms", "IQR ms", "min-max ms", "samples/s"]
    if two:
        headers.append("speed-up")
    rows = []
    for r in result.results:
        for i, (label, t) in enumerate(zip(result.models, r.timings)):
            row = [r.batch if i == 0 else "", label, _ms(t.median),
                   f"{_ms(t.q1)}-{_ms(t.q3)}", f"{_ms(t.min)}-{_ms(t.max)}",
                   f"{t.samples_per_second:.0f}"]
            if two:
                row.append(f"{r.speedup:.2f}x" if i == 1 else "")
            rows.append(row)
    text = table(headers, rows, "ll" + "r" * (len(headers) - 2))
    if two:
        text += (f"\n\nspeed-up = {result.models[0]} median / {result.models[1]} median "
                 "(> 1: the second is faster)")
    return text


def _ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"
