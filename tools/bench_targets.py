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

4. No pass breaks fusion: per model, target and runtime (tensorrt: onnxruntime and OpenVINO as
   a proxy, there is no TensorRT here), the INT8 model of the optimized model against the INT8
   model of the original (``QuantizeConfig(optimize=False)``, ``quantize --no-optimize``),
   alternating; original / optimized >= 1 within the spread means no pass broke a fusion.
5. PP-OCRv4 det (``--sections ppocr``; tools/zoo data, rendered 480x640 pages): per target, FP32
   vs INT8 latency at batch 1 and 32 in the target's runtime, hmean and map SQNR there.
6. TensorRT on the zoo (``--sections trt-zoo``): every tools/zoo model quantized for the
   onnxruntime target (its default, per-tensor) and the tensorrt target (per-channel default
   and per-tensor), each through ``onnxrep.quantize`` (which raises, and the CLI exits 3,
   when a TensorRT rule breaks), scored in onnxruntime with the zoo metric; plus the shipped
   models' top-1 under both targets.

usage: python tools/bench_targets.py [--threads 1] [--rounds 1000]
       [--sections targets,variants,profile,fusion,ppocr,trt-zoo]
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


def time_models(models: dict, runtime: str, threads: int, rounds: int, feeds=feeds_for) -> dict:
    """{batch: {label: Timing}} with every model of ``models`` alternating, per batch;
    ``feeds(batch)`` gives the inputs."""
    sessions = {k: session(m, runtime, threads=threads) for k, m in models.items()}
    out = {}
    for batch in BATCHES:
        feeds_b = feeds(batch)
        labels = list(sessions)
        calls = [(lambda s=sessions[k]: s.run(feeds_b)) for k in labels]
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


# ---- sections 1-3 -----------------------------------------------------------------------------

def quantize_all() -> dict[str, dict[str, onnx.ModelProto]]:
    """{model: {"fp32" / target / variant label: model}}."""
    start = time.time()
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
    return quantized


def targets(quantized: dict, data, threads: int, rounds: int) -> None:
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
                t = time_models({"fp32": q["fp32"], "int8": q[tname]}, runtime, threads,
                                rounds)
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



def variants(quantized: dict, data, threads: int, rounds: int) -> None:
    print("\n## OpenVINO: placement and types (each INT8 vs FP32 in OpenVINO, all alternating)\n")
    print("| model | INT8 variant | top-1 (OpenVINO) | b1 ms | b1 speed-up | b32 ms | "
          "b32 speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, q in quantized.items():
        group = {"FP32": q["fp32"], **{label: q[label] for label in VARIANTS}}
        t = time_models(group, "openvino", threads, rounds)
        for label in group:
            acc = top1(group[label], data, "openvino")
            cells = []
            for b in BATCHES:
                cells += [f"{1000 * t[b][label].median:.3f}",
                          f"{t[b]['FP32'].median / t[b][label].median:.2f}x"]
            print(f"| {name} | {label} | {acc:.2f} | " + " | ".join(cells) + " |", flush=True)



def profile(quantized: dict, threads: int, rounds: int) -> None:
    print("\n## OpenVINO per op type, batch 32 (PERF_COUNT: per node the minimum us over "
          "rounds, summed per op type; kernels in brackets)\n")
    chosen = ("onnxruntime layout, per-channel",
              "onnxruntime layout, per-channel, depthwise FP32",
              "op inputs (NNCF-like), per-channel")
    profiles = {}
    for name, q in quantized.items():
        group = {"FP32": q["fp32"], **{c: q[c] for c in chosen}}
        profiles[name] = nodes = node_times(group, threads, max(50, rounds // 3))
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


# ---- 4. no pass breaks fusion ------------------------------------------------------------------

# target -> the runtimes its INT8 model is timed in (no TensorRT here: its QDQ runs in both
# CPU runtimes as a proxy for "no op was put where a fusion happens")
FUSION_RUNTIMES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                   "tensorrt": ("onnxruntime", "openvino")}


def fusion(models: dict, calib, threads: int, rounds: int, feeds=feeds_for) -> None:
    """For every model, target and runtime: the INT8 model of the optimized model
    (``quantize``) against the INT8 model of the original (``quantize --no-optimize``),
    alternating; the ratio original / optimized is >= 1 (within the spread) when no pass
    broke a fusion."""
    print("\n## No pass breaks fusion: INT8 of the optimized model vs INT8 of the original "
          "(`quantize --no-optimize`), same target, same runtime, alternating\n")
    print("(tensorrt: no GPU or TensorRT here; its QDQ runs in onnxruntime and OpenVINO as a "
          "proxy)\n")
    print("| model | target | runtime | b1 original ms | b1 optimized ms | b1 original / "
          "optimized | b32 original ms | b32 optimized ms | b32 original / optimized |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, fp32 in models.items():
        for tname, runtimes in FUSION_RUNTIMES.items():
            pair = {"original": quantize(fp32, calib, QuantizeConfig(target=tname,
                                                                     optimize=False)),
                    "optimized": quantize(fp32, calib, QuantizeConfig(target=tname))}
            for runtime in runtimes:
                t = time_models(pair, runtime, threads, rounds, feeds)
                cells = []
                for b in sorted(t):
                    o, p = t[b]["original"].median, t[b]["optimized"].median
                    cells += [f"{1000 * o:.3f}", f"{1000 * p:.3f}", f"{o / p:.2f}"]
                print(f"| {name} | {tname} | {runtime} | " + " | ".join(cells) + " |",
                      flush=True)


# ---- 5. PP-OCRv4 det ---------------------------------------------------------------------------

PPOCR_SHAPE = (1, 3, 480, 640)  # the rendered test pages' size; batch 32 peaked at 1.8 GB RSS
PPOCR_TARGETS = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                 "tensorrt": ("onnxruntime", "openvino")}


def ppocr(threads: int, rounds: int, calib_n: int, test_n: int) -> None:
    """PP-OCRv4 det (tools/zoo): each target's INT8 model (``quantize --target``, defaults)
    against FP32 in that target's runtime (tensorrt: in both CPU runtimes, accuracy only
    meaningful as a proxy): latency at batch 1 and 32 at 480x640, alternating; hmean and the
    probability map's SQNR against the FP32 map of the same runtime on the rendered test
    pages."""
    from onnxrep.bench import bench
    from onnxrep.runtime import session as make_session
    from zoo.models import SPECS, harness, score

    model, calib, test, _ = harness("ppocrv4_det", calib=calib_n, test=test_n)
    x = next(iter(test["inputs"].values()))
    spec = SPECS["ppocrv4_det"]
    fp32 = onnx.load(str(model))
    print(f"\n## PP-OCRv4 det ({calib_n} calibration, {test_n} test pages {x.shape[2]}x"
          f"{x.shape[3]}; latency on seeded random inputs of that size)\n")
    print("| target | runtime | hmean FP32 | hmean INT8 | map SQNR dB | b1 FP32 ms | b1 INT8 ms "
          "| b1 speed-up | b32 FP32 ms | b32 INT8 ms | b32 speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    refs: dict = {}

    def outputs(m, runtime):
        s = make_session(m, runtime, threads=threads)
        chunks = [s.run({"x": x[i:i + spec.batch]}) for i in range(0, len(x), spec.batch)]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    for tname, runtimes in PPOCR_TARGETS.items():
        start = time.time()
        q = quantize(fp32, str(calib), QuantizeConfig(target=tname))
        print(f"quantized PP-OCRv4 det for {tname} ({time.time() - start:.0f} s)",
              file=sys.stderr, flush=True)
        for runtime in runtimes:
            if runtime not in refs:
                refs[runtime] = outputs(fp32, runtime)
            ref = refs[runtime]
            acc_fp = score(spec, ref, ref, test["labels"])["hmean"]
            got = score(spec, outputs(q, runtime), ref, test["labels"])
            cells = []
            for b, n in ((1, rounds), (32, max(4, rounds // 8))):
                r = bench([fp32, q], runtime=runtime, batches=[b], threads=threads, rounds=n,
                          warmup=2, shapes={"x": PPOCR_SHAPE}).results[0]
                f, i = r.timings[0].median, r.timings[1].median
                cells += [f"{1000 * f:.1f}", f"{1000 * i:.1f}", f"{f / i:.2f}x"]
            print(f"| {tname} | {runtime} | {100 * acc_fp:.2f} | {100 * got['hmean']:.2f} | "
                  f"{got['sqnr']:.2f} | " + " | ".join(cells) + " |", flush=True)


# ---- 6. TensorRT rules and accuracy on the zoo ----------------------------------------------

ZOO = ("ppocrv4_det", "ppocrv6_det", "ppocrv6_rec", "cls", "orientation", "layout")
# headline metric and its unit per zoo task (layout: output SQNR against FP32)
ZOO_METRIC = {"det": ("hmean", 100, ""), "rec": ("char_acc", 100, ""), "cls": ("top1", 100, ""),
              "layout": ("sqnr", 1, " dB")}


def trt_zoo(calib_n: int, test_n: int, data, models=ZOO) -> None:
    """Per zoo model: the onnxruntime target's INT8 and the tensorrt target's (per-channel,
    its default, and per-tensor) scored in onnxruntime with the zoo metric (the map / output
    SQNR against FP32 beside it), the number of TensorRT rule violations (``quantize`` raises
    on any, so a row at all means 0) and the quantize time; then the shipped models. An FP32
    SQNR against itself is infinite ("-")."""
    import tempfile

    from zoo.models import SPECS, harness

    print(f"\n## TensorRT target on the zoo: accuracy in onnxruntime ({calib_n} calibration, "
          f"{test_n} test samples)\n")
    print("| model | metric | FP32 | onnxruntime target | tensorrt per-channel | "
          "tensorrt per-tensor | SQNR dB ort / trt-pc / trt-pt | TensorRT rule violations |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    configs = {"ort": QuantizeConfig(target="onnxruntime"),
               "pc": QuantizeConfig(target="tensorrt", per_channel=True),
               "pt": QuantizeConfig(target="tensorrt", per_channel=False)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model, calib, _, metric = harness(name, calib=calib_n, test=test_n)
            key, mult, unit = ZOO_METRIC[SPECS[name].task]
            fp32 = onnx.load(str(model))
            scores, broken = {}, 0
            for label, config in configs.items():
                start = time.time()
                q = quantize(fp32, str(calib), config)
                if label != "ort":
                    broken += len(check_tensorrt_rules(q, per_channel=config.per_channel))
                path = Path(tmp) / f"{name}.{label}.onnx"
                onnx.save(q, str(path))
                scores[label] = metric(path)
                print(f"{name} {label}: quantized and scored ({time.time() - start:.0f} s)",
                      file=sys.stderr, flush=True)
            ref = metric(model)[key]
            ref = "-" if ref is None else f"{mult * ref:.2f}{unit}"
            cells = [f"{mult * scores[k][key]:.2f}{unit}" for k in configs]
            sqnr = " / ".join(f"{scores[k]['sqnr']:.2f}" for k in configs)
            print(f"| {name} | {key} | {ref} | " + " | ".join(cells)
                  + f" | {sqnr} | {broken} |", flush=True)
    for name, path in MODELS.items():
        fp32 = onnx.load(str(path))
        qs = {k: quantize(fp32, str(CALIB), c) for k, c in configs.items()}
        acc = {k: top1(q, data, "onnxruntime") for k, q in qs.items()}
        broken = sum(len(check_tensorrt_rules(qs[k], per_channel=configs[k].per_channel))
                     for k in ("pc", "pt"))
        print(f"| {name} (shipped) | top1 | {top1(fp32, data, 'onnxruntime'):.2f} | "
              + " | ".join(f"{acc[k]:.2f}" for k in configs) + f" | - | {broken} |",
              flush=True)


# ---- main --------------------------------------------------------------------------------------

SECTIONS = ("targets", "variants", "profile", "fusion", "ppocr", "trt-zoo")


def main(argv=None) -> int:
    import onnxruntime
    import openvino

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=1000,
                   help="timed rounds at batch 1 (a third at batch 32)")
    p.add_argument("--sections", default=",".join(SECTIONS[:4]),
                   help=f"comma-separated, of {', '.join(SECTIONS)} (default: all but ppocr "
                        "and trt-zoo)")
    p.add_argument("--ppocr-rounds", type=int, default=20,
                   help="ppocr: timed rounds at batch 1 (an eighth, at least 4, at batch 32)")
    p.add_argument("--ppocr-calib", type=int, default=32, help="ppocr calibration pages")
    p.add_argument("--ppocr-test", type=int, default=64, help="ppocr test pages")
    p.add_argument("--zoo-calib", type=int, default=32, help="trt-zoo calibration samples")
    p.add_argument("--zoo-test", type=int, default=32, help="trt-zoo test samples")
    p.add_argument("--zoo-models", default=",".join(ZOO),
                   help="trt-zoo: comma-separated zoo models (default: all)")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    cpu = cpu_info()
    start = time.time()
    print(f"onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__} (CPU plugin, "
          f"f32 inference precision); intra-op threads {args.threads}; median ms per call, "
          f"all models of a table row group alternating\n")
    print(f"CPU: {cpu.line()}\n")
    if {"targets", "variants", "profile"} & set(sections):
        quantized = quantize_all()
        data, data_label = test_data()
        print(f"top-1 on {data_label}\n")
        if "targets" in sections:
            targets(quantized, data, args.threads, args.rounds)
        if "variants" in sections:
            variants(quantized, data, args.threads, args.rounds)
        if "profile" in sections:
            profile(quantized, args.threads, args.rounds)
    if "fusion" in sections:
        fusion({name: onnx.load(str(path)) for name, path in MODELS.items()}, str(CALIB),
               args.threads, args.rounds)
    if "ppocr" in sections:
        ppocr(args.threads, args.ppocr_rounds, args.ppocr_calib, args.ppocr_test)
    if "trt-zoo" in sections:
        trt_zoo(args.zoo_calib, args.zoo_test, test_data()[0], args.zoo_models.split(","))
    print(f"\n({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
