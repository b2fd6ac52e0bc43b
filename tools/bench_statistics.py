"""Benchmark the statistics pass against plain onnxruntime inference over the same data.

For each --samples count (default 256 and 4096), each measured in its own child process:
  plain  = onnxruntime inference (graph optimizations on, as users run it) over all batches
  floor  = the same inference with one GlobalAveragePool added on every Conv output, the
           cheapest reduction there is: a lower bound for any collector that reads every
           pre-activation inside onnxruntime (the outputs can no longer be fused with their
           ReLU); no statistics are computed
  stats  = onnxrep's collect_statistics over the same batches (every Conv/Gemm output)
and prints time ratios to plain (best of --repeat runs after a warm-up) and each child's
peak RSS (resource.getrusage ru_maxrss: the whole process, imports included; tracemalloc would
miss onnxruntime's allocations). The data is streamed from a generator, so neither side holds
the samples: equal peaks at 256 and 4096 samples show that the pass's memory does not grow
with the data. Uses models/mobileone_fmnist.onnx with models/fmnist_calib.npz (cycled) when
present, else a small conv net with random inputs; --model/--data pick another one-input model
(data: an .npz with the samples under the input's name, or as its only array).

usage: python tools/bench_statistics.py [--batch-size 32] [--repeat 3] [--workers 1]
                                        [--samples 256,4096] [--model M.onnx --data D.npz]
       python tools/bench_statistics.py --ppocr --batch-size 8 --samples 64,256 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "mobileone_fmnist.onnx"
CALIB = ROOT / "models" / "fmnist_calib.npz"

CHILD = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
from onnxrep.data.readers import load_data
from onnxrep.analysis.statistics import collect_statistics
from onnxrep.ir.model import load

path, data, mode, samples, batch, repeat, workers = sys.argv[1:8]
samples, batch, repeat, workers = int(samples), int(batch), int(repeat), int(workers)
model = load(path)
name = model.graph.input[0].name
with np.load(data) as arrays:
    pool = arrays[name] if name in arrays else arrays[arrays.files[0]]

def batches():
    for start in range(0, samples, batch):
        idx = np.arange(start, min(start + batch, samples)) % len(pool)
        yield {name: pool[idx]}

def floor_model():
    from onnx import helper
    outs = []
    for i, node in enumerate([n for n in model.graph.node if n.op_type == "Conv"]):
        outs.append(f"floor_gap{i}")
        model.graph.node.append(helper.make_node("GlobalAveragePool", [node.output[0]],
                                                 [outs[-1]]))
    model.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outs)
    return model.SerializeToString()

source = floor_model() if mode == "floor" else path

def once():
    t = time.perf_counter()
    if mode in ("plain", "floor"):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        for feeds in batches():
            sess.run(None, feeds)
    else:
        stats = collect_statistics(model, load_data(batches(), model, batch_size=batch),
                                   workers=workers)
        assert stats.samples == samples
    return time.perf_counter() - t

once()  # warm-up: imports, page cache
best = min(once() for _ in range(repeat))
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": best, "peak_mb": peak_kb / 1024}))
"""


def tiny_model(path: Path) -> None:
    """conv -> relu stack with a GAP -> Gemm head, [N, 1, 28, 28] input."""
    rng = np.random.default_rng(0)
    nodes, inits, t, cin = [], [], "input", 1
    for i, (cout, stride, group) in enumerate([(16, 1, 1), (16, 2, 16), (32, 1, 1),
                                              (32, 2, 32), (64, 1, 1)]):
        w = rng.normal(0, 0.3, (cout, cin // group, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [t, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                                   pads=[1] * 4, strides=[stride] * 2, group=group),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        t, cin = f"r{i}", cout
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (10, cin)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [t], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", 1, 28, 28])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def ppocr(tmp: Path) -> tuple[Path, Path]:
    """The fetched PP-OCRv4 detector and an .npz of 64 rendered text images for it."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_ppocr import preprocess, render
    from fetch_ppocr import fetch

    data = tmp / "ppocr.npz"
    np.savez(data, x=preprocess([render(1000 + i, (160, 224)) for i in range(64)]))
    return fetch(), data


def child(model: Path, data: Path, mode: str, samples: int, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), mode, str(samples),
                          str(args.batch_size), str(args.repeat), str(args.workers)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="processes for the statistics pass")
    p.add_argument("--samples", default="256,4096",
                   help="comma-separated sample counts (default %(default)s)")
    p.add_argument("--model", type=Path, help="model to measure (one input)")
    p.add_argument("--data", type=Path,
                   help=".npz with the samples under the input's name (else its first array)")
    p.add_argument("--ppocr", action="store_true",
                   help="PP-OCRv4's detector (tools/fetch_ppocr.py) on 64 rendered 160x224 text "
                        "images, cycled")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxrep-bench-stats-") as tmp:
        if args.ppocr:
            model, data = ppocr(Path(tmp))
            what = f"{model.name} on 64 rendered 160x224 text images (cycled)"
        elif args.model and args.data:
            model, data, what = args.model, args.data, f"{args.model.name} on {args.data.name}"
        elif SHIPPED.exists() and CALIB.exists():
            model, data, what = SHIPPED, CALIB, f"{SHIPPED.name} on {CALIB.name} (cycled)"
        else:
            model, data = Path(tmp) / "tiny.onnx", Path(tmp) / "data.npz"
            tiny_model(model)
            np.savez(data, input=np.random.default_rng(1).standard_normal(
                (512, 1, 28, 28)).astype(np.float32))
            what = "a 5-conv test net on random inputs (shipped model absent)"
        print(f"{what}; batch {args.batch_size}, best of {args.repeat}, "
              f"statistics workers {args.workers}")
        print(f"{'samples':>8} {'plain s':>9} {'floor':>6} {'stats s':>9} {'ratio':>6} "
              f"{'plain MB':>9} {'stats MB':>9}")
        for samples in map(int, args.samples.split(",")):
            plain = child(model, data, "plain", samples, args)
            floor = child(model, data, "floor", samples, args)
            stats = child(model, data, "stats", samples, args)
            print(f"{samples:>8} {plain['seconds']:>9.3f} "
                  f"{floor['seconds'] / plain['seconds']:>6.2f} {stats['seconds']:>9.3f} "
                  f"{stats['seconds'] / plain['seconds']:>6.2f} {plain['peak_mb']:>9.1f} "
                  f"{stats['peak_mb']:>9.1f}")


if __name__ == "__main__":
    main()
