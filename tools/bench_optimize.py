"""Benchmark `onnxrep optimize` on a 44M-parameter plain 3x3 chain (RepVGG-B1 scale).

Prints, measured in one run, each step in its own child process:
  time ratio   = optimize wall time / (onnx.load + onnx.save wall time) of the same file
  memory ratio = optimize peak RSS growth / file size   (RSS after imports subtracted),
                 and the whole-process peak RSS / file size (imports included)
The load+save row's memory is shown for scale: reading a protobuf already peaks at ~2x.
Targets (issue 2): time ratio <= 4, memory ratio <= 4.

usage: python tools/bench_optimize.py [--keep DIR]
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

# stage widths and depths: RepVGG-B1 layout with stage 3 cut from 16 to 13 layers (44M params)
STAGES = [(64, 1), (128, 4), (256, 6), (512, 13), (2048, 1)]

CHILD = r"""
import json, sys, time
import onnx, numpy, onnxruntime
from onnxrep.cli import main
def hwm():  # peak RSS of this process image in kB (ru_maxrss would carry the parent's over)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0])
base = hwm()
src, dst, mode = sys.argv[1:4]
t = time.perf_counter()
if mode == "loadsave":
    onnx.save(onnx.load(src), dst)
    code = 0
else:
    code = main(["optimize", src, "-o", dst, "-q", "--force", "--json"])
elapsed = time.perf_counter() - t
peak = hwm()
print(json.dumps({"seconds": elapsed, "rss_growth_kb": peak - base, "peak_kb": peak,
                  "code": code}),
      file=sys.stderr)
"""


def build(path: Path, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    nodes, inits, cin, t, params = [], [], 3, "input", 0
    for s, (width, depth) in enumerate(STAGES):
        for d in range(depth):
            stride = 2 if d == 0 else 1
            w = rng.normal(0, (2 / (9 * cin)) ** 0.5, (width, cin, 3, 3)).astype(np.float32)
            w[rng.integers(0, width, 2)] *= 50.0  # a few outlier channels, as merging leaves
            b = rng.normal(0, 0.1, width).astype(np.float32)
            name = f"s{s}_{d}"
            inits += [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
            nodes.append(helper.make_node("Conv", [t, f"{name}.w", f"{name}.b"], [f"{name}.c"],
                                          name=name, kernel_shape=[3, 3], pads=[1] * 4,
                                          strides=[stride] * 2))
            nodes.append(helper.make_node("Relu", [f"{name}.c"], [f"{name}.r"]))
            t, cin, params = f"{name}.r", width, params + w.size + b.size
    fc = rng.normal(0, 0.02, (1000, cin)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")]
    nodes += [helper.make_node("GlobalAveragePool", [t], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1)]
    params += fc.size + 1000
    graph = helper.make_graph(nodes, "repvgg_b1_like",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return params


def child(src: Path, dst: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), mode],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"{mode} failed: {proc.stderr}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="directory to keep the models in")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        src = root / "b1_like.onnx"
        params = build(src)
        size = src.stat().st_size
        base = child(src, root / "copy.onnx", "loadsave")
        opt = child(src, root / "b1_like.opt.onnx", "optimize")
    print(f"model: {params / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB")
    print("| step | seconds | peak RSS growth (MiB) |")
    print("|---|---|---|")
    print(f"| onnx.load + onnx.save | {base['seconds']:.2f} | {base['rss_growth_kb'] / 1024:.0f} |")
    print(f"| onnxrep optimize | {opt['seconds']:.2f} | {opt['rss_growth_kb'] / 1024:.0f} |")
    print(f"time ratio (optimize / load+save): {opt['seconds'] / base['seconds']:.2f}  (target <= 4)")
    print(f"memory ratio (optimize RSS growth / file size): "
          f"{opt['rss_growth_kb'] * 1024 / size:.2f}  (target <= 4)")
    print(f"whole-process peak RSS / file size (what a memory limit sees; imports included): "
          f"optimize {opt['peak_kb'] * 1024 / size:.2f}, load+save "
          f"{base['peak_kb'] * 1024 / size:.2f}  (target <= 4)")


if __name__ == "__main__":
    main()
