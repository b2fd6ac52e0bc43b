"""Deployment targets on the shipped models: FP32 vs INT8 latency and top-1 in each target's
runtime, OpenVINO placement variants, and where MobileOne's time goes in OpenVINO.

1. Targets. Each shipped model (RepVGG, MobileOne) is quantized with every profile of
   ``onnxrep.ptq.targets`` through ``onnxrep.quantize`` (``QuantizeConfig(target=...)``:
   optimize passes, calibration on models/fmnist_calib.npz, bias correction). The onnxruntime profile
   is timed and scored in onnxruntime, the openvino profile in OpenVINO, the tensorrt profile
   scored in onnxruntime (no TensorRT here: accuracy only, plus the rule check).
2. OpenVINO variants: placements and types for the openvino profile, each timed against FP32
   in OpenVINO and scored there: onnxruntime's layout (outputs quantized, ReLU folded, int32
   bias) per-tensor / per-channel, Q/DQ on op inputs only as NNCF places it (uint8
   activations with zero point 0 after ReLU, float bias), the TensorRT layout, each with and
   without the depthwise convolutions left in float.
3. Per op type: OpenVINO's own per-node timings (PERF_COUNT, minimum over rounds) at batch 32,
   grouped into stem (dense kxk) conv, depthwise conv, 1x1 conv, fully connected and the rest
   (quantize, reorders, pooling), FP32 against INT8 variants, with the kernels it picked.

Timing: for each runtime and batch size, all models' sessions are called in turn, the order
flipping every round (``onnxrep.bench.alternate``), after a warm-up; the median per call is
reported, and speed-ups are FP32 median / INT8 median of the same run. Top-1: the 10,000
Fashion-MNIST test images when Debian's dataset-fashion-mnist is installed (as
tools/bench_ptq.py reads them), else the 2,000 shipped ones.

usage: python tools/bench_targets.py [--threads 1] [--rounds 1000] [--skip-profile]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from onnxrep.bench import alternate, summarize  # noqa: E402
from onnxrep.cpu import cpu_info  # noqa: E402
from onnxrep.evaluation import evaluate  # noqa: E402
from onnxrep.runtime import session  # noqa: E402
from onnxrep.ptq.quantizer import QuantizeConfig, quantize  # noqa: E402
from onnxrep.ptq.targets import (OPENVINO, ORT_OP_TYPES, TARGETS, TENSORRT,  # noqa: E402
                                 check_tensorrt_rules)

MODELS = {"RepVGG": ROOT / "models" / "repvgg_fmnist.onnx",
          "MobileOne": ROOT / "models" / "mobileone_fmnist.onnx"}
CALIB = ROOT / "models" / "fmnist_calib.npz"
BATCHES = (1, 32)

# op-input placement as NNCF writes ONNX for OpenVINO: Q/DQ on the inputs of quantized ops,
# no output quantization, ReLU kept, float bias, uint8 activations whose zero point snaps to 0
# when the range starts at 0 (after ReLU)
NNCF_LIKE = dataclasses.replace(
    OPENVINO, name="inputs", float_depthwise=False,
    op_types=("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool",
              "GlobalAveragePool"),
    extra_options={"QuantizeBias": False, "ActivationRestrictedAsymmetric": True,
                   "OpTypesToExcludeOutputQuantization": list(TENSORRT.extra_options[
                       "OpTypesToExcludeOutputQuantization"]),
                   "ForceQuantizeNoInputCheck": True})
ORT_LAYOUT = dataclasses.replace(OPENVINO, name="ort-layout", float_depthwise=False,
                                 op_types=ORT_OP_TYPES)
# label -> (target, per_channel)
VARIANTS = {
    "onnxruntime layout, per-tensor": (ORT_LAYOUT, False),
    "onnxruntime layout, per-channel": (ORT_LAYOUT, True),
    "onnxruntime layout, per-tensor, depthwise FP32": (
        dataclasses.replace(ORT_LAYOUT, float_depthwise=True), False),
    "onnxruntime layout, per-channel, depthwise FP32": (
        dataclasses.replace(ORT_LAYOUT, float_depthwise=True), True),
    "op inputs (NNCF-like), per-channel": (NNCF_LIKE, True),
    "op inputs (NNCF-like), per-channel, depthwise FP32": (
        dataclasses.replace(NNCF_LIKE, float_depthwise=True), True),
    "tensorrt profile (int8 symmetric)": (TENSORRT, True),
}


def test_data() -> tuple[object, str]:
    try:
        from bench_ptq import FMNIST, test_set

        if (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
            return test_set(), "10,000 Fashion-MNIST test images"
    except ImportError:
        pass
    return str(ROOT / "models" / "fmnist_eval.npz"), "2,000 shipped test images"


def feeds_for(batch: int) -> dict:
    x = np.load(CALIB)["input"]
    return {"input": x[np.random.default_rng(0).integers(0, len(x), batch)]}


def time_models(models: dict, runtime: str, threads: int, rounds: int) -> dict:
    """{batch: {label: Timing}} with every model of ``models`` alternating, per batch."""
    sessions = {k: session(m, runtime, threads=threads) for k, m in models.items()}
    out = {}
    for batch in BATCHES:
        feeds = feeds_for(batch)
        labels = list(sessions)
        calls = [(lambda s=sessions[k]: s.run(feeds)) for k in labels]
        n = rounds if batch == 1 else max(20, rounds // 3)
        times = alternate(calls, n, max(5, n // 10))
        out[batch] = {k: summarize(t, batch) for k, t in zip(labels, times)}
    return out


def top1(model, data, runtime: str) -> float:
    return 100 * evaluate(model, data, runtime=runtime).top1


# ---- per-op-type profile -----------------------------------------------------------------------

def category(node_type: str, exec_type: str, name: str) -> str:
    if node_type == "GroupConvolution":
        return "depthwise conv"
    if node_type == "Convolution":
        return "1x1 conv" if "1x1" in exec_type else "kxk conv (stem)"
    if node_type.startswith("FullyConnected"):
        return "fully connected"
    if node_type == "Reorder":
        return "reorder (layout/precision conversion)"
    return "other (quantize subgraphs, pooling)"


def node_times(models: dict, threads: int, rounds: int, batch: int = 32) -> dict:
    """{label: {node: (node_type, exec_type, minimum us)}} from OpenVINO's PERF_COUNT with
    the models alternating. The minimum over rounds, not the median: on a shared 2-core
    machine a node's median moved 2-6x between runs (another process took the core mid-call)
    while its minimum stayed within a few microseconds."""
    from onnxrep.runtime import OpenVINOSession

    feeds = feeds_for(batch)
    sessions = {}
    for label, model in models.items():
        s = OpenVINOSession(model, threads)
        s.config["PERF_COUNT"] = True
        s.prepare(feeds)
        sessions[label] = s
    best = {k: {} for k in sessions}
    labels = list(sessions)
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            s = sessions[label]
            s.run(feeds)
            if r < 5:
                continue
            _, request = s.compiled({k: v.shape for k, v in feeds.items()})
            for p in request.get_profiling_info():
                if p.status != p.Status.EXECUTED:
                    continue
                us = p.real_time.total_seconds() * 1e6
                old = best[label].get(p.node_name)
                if old is None or us < old[2]:
                    best[label][p.node_name] = (p.node_type, p.exec_type, us)
    return best


def by_category(nodes: dict) -> dict:
    """{category: (summed us, kernels)} of one model's node_times."""
    cats = collections.defaultdict(lambda: [0.0, set()])
    for node, (node_type, exec_type, us) in nodes.items():
        c = cats[category(node_type, exec_type, node)]
        c[0] += us
        c[1].add(exec_type)
    return {k: (v[0], sorted(v[1])) for k, v in cats.items()}


def short(node: str, node_type: str = "") -> str:
    if node_type == "Reorder":
        return "reorder before " + short(node.split("_")[-1] if "_/" in node else node)
    parts = [p for p in node.split("/") if p]
    keep = [p for p in parts if p.startswith("stages.") and p.count(".") == 2] + \
        [p for p in parts if p in ("stem", "dw", "pw")]
    return "/".join(keep) or node[:40]


# ---- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import onnxruntime
    import openvino

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=1000,
                   help="timed rounds at batch 1 (a third at batch 32)")
    p.add_argument("--skip-profile", action="store_true", help="no per-op-type tables")
    args = p.parse_args(argv)
    data, data_label = test_data()
    cpu = cpu_info()
    start = time.time()
    print(f"onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__} (CPU plugin, "
          f"f32 inference precision); intra-op threads {args.threads}; median ms per call, "
          f"all models of a table row group alternating; top-1 on {data_label}\n")
    print(f"CPU: {cpu.line()}\n")
    quantized: dict[str, dict[str, onnx.ModelProto]] = {}
    for name, path in MODELS.items():
        fp32 = onnx.load(str(path))
        quantized[name] = {"fp32": fp32}
        for tname, target in TARGETS.items():
            quantized[name][tname] = quantize(fp32, str(CALIB), QuantizeConfig(target=target))
        for label, (target, pc) in VARIANTS.items():
            quantized[name][label] = quantize(fp32, str(CALIB),
                                              QuantizeConfig(target=target, per_channel=pc))
        print(f"quantized {name}: {len(VARIANTS) + len(TARGETS)} models "
              f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    # ---- 1. targets
    print("## Targets: FP32 vs INT8 in the target's runtime\n")
    print("| model | target | runtime | top-1 FP32 | top-1 INT8 | b1 FP32 ms | b1 INT8 ms | "
          "b1 speed-up | b32 FP32 ms | b32 INT8 ms | b32 speed-up |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rule_notes = []
    for name, q in quantized.items():
        for tname, runtime in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"),
                               ("tensorrt", "onnxruntime")):
            acc_fp, acc_q = top1(q["fp32"], data, runtime), top1(q[tname], data, runtime)
            if tname == "tensorrt":
                cells = ["-"] * 6
                violations = check_tensorrt_rules(q[tname])
                rule_notes.append(f"{name} tensorrt profile: {len(violations)} TensorRT rule "
                                  "violations")
            else:
                t = time_models({"fp32": q["fp32"], "int8": q[tname]}, runtime, args.threads,
                                args.rounds)
                cells = []
                for b in BATCHES:
                    f, i = t[b]["fp32"].median, t[b]["int8"].median
                    cells += [f"{1000 * f:.3f}", f"{1000 * i:.3f}", f"{f / i:.2f}x"]
            print(f"| {name} | {tname} | {runtime} | {acc_fp:.2f} | {acc_q:.2f} | "
                  + " | ".join(cells) + " |", flush=True)
    print()
    for note in rule_notes:
        print(note)
    diffs = [f"{name} {top1(q['tensorrt'], data, 'onnxruntime') - top1(q['onnxruntime'], data, 'onnxruntime'):+.2f} pp"  # noqa: E501
             for name, q in quantized.items()]
    print("\ntensorrt top-1 minus onnxruntime-profile top-1 (both in onnxruntime): "
          + ", ".join(diffs))

    # ---- 2. OpenVINO variants
    print("\n## OpenVINO: placement and types (each INT8 vs FP32 in OpenVINO, all alternating)\n")
    print("| model | INT8 variant | top-1 (OpenVINO) | b1 ms | b1 speed-up | b32 ms | "
          "b32 speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, q in quantized.items():
        group = {"FP32": q["fp32"], **{label: q[label] for label in VARIANTS}}
        t = time_models(group, "openvino", args.threads, args.rounds)
        for label in group:
            acc = top1(group[label], data, "openvino")
            cells = []
            for b in BATCHES:
                cells += [f"{1000 * t[b][label].median:.3f}",
                          f"{t[b]['FP32'].median / t[b][label].median:.2f}x"]
            print(f"| {name} | {label} | {acc:.2f} | " + " | ".join(cells) + " |", flush=True)

    if args.skip_profile:
        return 0
    # ---- 3. per op type, OpenVINO, batch 32
    print("\n## OpenVINO per op type, batch 32 (PERF_COUNT: per node the minimum us over "
          "rounds, summed per op type; kernels in brackets)\n")
    chosen = ("onnxruntime layout, per-channel",
              "onnxruntime layout, per-channel, depthwise FP32",
              "op inputs (NNCF-like), per-channel")
    profiles = {}
    for name, q in quantized.items():
        group = {"FP32": q["fp32"], **{c: q[c] for c in chosen}}
        profiles[name] = nodes = node_times(group, args.threads, max(50, args.rounds // 3))
        cats = {k: by_category(v) for k, v in nodes.items()}
        names = sorted({c for v in cats.values() for c in v})
        print(f"{name}:\n")
        print("| op type | " + " | ".join(group) + " |")
        print("|---|" + "---:|" * len(group))
        for c in names:
            print(f"| {c} | " + " | ".join(
                f"{cats[k][c][0]:.0f} ({', '.join(cats[k][c][1])})" if c in cats[k] else "-"
                for k in group) + " |")
        print("| total | " + " | ".join(f"{sum(v[0] for v in cats[k].values()):.0f}"
                                        for k in group) + " |\n")
    # per layer for MobileOne
    nodes = profiles["MobileOne"]
    cols = list(nodes)
    print("MobileOne per layer, batch 32 (OpenVINO PERF_COUNT, minimum us; the INT8 / FP32 "
          "ratio of the per-channel onnxruntime layout last):\n")
    print("| layer | " + " | ".join(cols) + " | INT8 / FP32 |")
    print("|---|" + "---:|" * (len(cols) + 1))
    rows = collections.defaultdict(dict)
    for label, per in nodes.items():
        for node, (node_type, exec_type, us) in per.items():
            rows[short(node, node_type)][label] = (us, exec_type)
    for layer, cells in rows.items():
        if "FP32" not in cells and chosen[0] not in cells:
            continue
        ratio = (f"{cells[chosen[0]][0] / cells['FP32'][0]:.2f}"
                 if chosen[0] in cells and "FP32" in cells and cells["FP32"][0] > 0 else "-")
        print(f"| {layer} | " + " | ".join(
            f"{cells[c][0]:.0f} ({cells[c][1]})" if c in cells else "-" for c in cols)
            + f" | {ratio} |")
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
