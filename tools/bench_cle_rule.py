"""What CLE's keep rule costs without data: onnxrep's summed rule against a per-layer rule.

For each shipped model, without calibration data (as `onnxrep optimize model.onnx` runs), the
deploy form (train-form blocks merged, BN folded; no CLE) is equalized three ways:
  none       no CLE: the deploy form itself;
  summed     onnxrep's rule (EqualizeConfig's default): a pair is kept when the mean-over-
             channels per-tensor INT8 weight SQNR summed over its two layers does not fall;
  per-layer  no layer may fall on either per-tensor INT8 weight SQNR (whole tensor, mean over
             channels): starting from the deploy form, coordinate ascent moves one channel's
             scale at a time toward (or, at finer steps, around) its full-CLE value, 1, 1/2,
             1/4, 1/8 of the remaining log-distance, keeping a move only if neither layer of its
             pair falls below its deploy-form SQNR and their summed SQNR rises.
Each row: layers whose SQNR fell below the deploy form's (either measure), the lowest mean-over-
channels SQNR of any layer, and top-1 on models/fmnist_eval.npz after per-tensor INT8 PTQ with
onnxrep's defaults minus its own passes (`quantize --no-optimize`, calibrated on
models/fmnist_calib.npz), FP32 top-1 for scale.

usage: python tools/bench_cle_rule.py [--models mobileone,repvgg] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxrep.evaluation import evaluate  # noqa: E402
from onnxrep.ir.graph import GraphIndex  # noqa: E402
from onnxrep.passes import equalize as eq  # noqa: E402
from onnxrep.pipeline import OptimizeConfig, optimize  # noqa: E402
from onnxrep.ptq.quantizer import QuantizeConfig, quantize  # noqa: E402

MODELS = {"mobileone": ROOT / "models/mobileone_fmnist.onnx",
          "repvgg": ROOT / "models/repvgg_fmnist.onnx"}
CALIB, EVAL = ROOT / "models/fmnist_calib.npz", ROOT / "models/fmnist_eval.npz"
FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def whole_sqnr(layer: eq._Layer) -> float:
    """Whole-tensor per-tensor INT8 SQNR (dB) of the layer's sampled weights as scaled."""
    values, out, inp = layer.sample
    x = values * layer.out_factor[out] * layer.in_factor[inp]
    step = float(layer.out_ranges().max()) / 127
    noise = float(np.sum((x - np.round(x / step) * step) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(x * x)) / noise)


def per_layer_rule(model: onnx.ModelProto) -> onnx.ModelProto:
    """The deploy form equalized so that no layer falls (coordinate ascent per channel)."""
    index = GraphIndex(model.graph)
    pairs, _ = eq.find_pairs(model, index)
    layers = eq._load_layers(index, pairs)
    totals, _, _ = eq._equalize(layers, pairs, eq.EqualizeConfig())
    target = [np.log(t) for t in totals]
    for layer in layers.values():
        layer.out_factor[:] = 1
        layer.in_factor[:] = 1
    floor = {i: (lay.int8_sqnr(), whole_sqnr(lay)) for i, lay in layers.items()}
    now = {i: v[0] for i, v in floor.items()}
    logt = [np.zeros_like(t) for t in target]
    for frac in FRACTIONS:
        for _ in range(6):
            moved = False
            for k, pair in enumerate(pairs):
                a, b = layers[pair.first], layers[pair.second]
                for c in np.argsort(-np.abs(target[k] - logt[k])):
                    d = (target[k][c] - logt[k][c]) * frac
                    if abs(d) < 1e-3:
                        continue
                    for step in ((d,) if frac == 1.0 else (d, -d)):
                        f = np.exp(step)
                        a.out_factor[c] /= f
                        b.in_factor[c] *= f
                        got = {pair.first: (a.int8_sqnr(), whole_sqnr(a)),
                               pair.second: (b.int8_sqnr(), whole_sqnr(b))}
                        holds = all(g[0] >= floor[i][0] - 1e-9 and g[1] >= floor[i][1] - 1e-9
                                    for i, g in got.items())
                        gain = sum(g[0] - now[i] for i, g in got.items())
                        if holds and gain > 1e-6:
                            now.update({i: g[0] for i, g in got.items()})
                            logt[k][c] += step
                            moved = True
                            break
                        a.out_factor[c] *= f
                        b.in_factor[c] /= f
            if not moved:
                break
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out_index = GraphIndex(out.graph)
    for layer in layers.values():
        eq._write_back(out_index, layer)
    return out


def layer_sqnrs(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """{layer: (mean-over-channels, whole-tensor) per-tensor INT8 weight SQNR}."""
    index = GraphIndex(model.graph)
    pairs, _ = eq.find_pairs(model, index)
    layers = eq._load_layers(index, pairs)
    return {index.labels[i]: (lay.int8_sqnr(), whole_sqnr(lay)) for i, lay in layers.items()}


def row(name: str, rule: str, model: onnx.ModelProto, deploy: dict) -> dict:
    sq = layer_sqnrs(model)
    fell = sum(1 for k, (c, w) in sq.items() if c < deploy[k][0] - 0.05 or w < deploy[k][1] - 0.05)
    q = quantize(model, str(CALIB), QuantizeConfig(optimize=False))
    top1 = evaluate(q, str(EVAL)).top1
    return {"model": name, "rule": rule, "layers_fell": fell, "layers": len(sq),
            "lowest_channel_sqnr": min(c for c, _ in sq.values()), "int8_top1": top1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        source = onnx.load(str(MODELS[name]))
        deploy = optimize(source, OptimizeConfig(equalize=eq.EqualizeConfig(max_scale=1.0)))
        base = layer_sqnrs(deploy)
        fp32 = evaluate(source, str(EVAL)).top1
        for rule, model in (("none", deploy), ("summed", optimize(source)),
                            ("per-layer", per_layer_rule(deploy))):
            rows.append({**row(name, rule, model, base), "fp32_top1": fp32})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| model | CLE rule | layers below the deploy form | lowest channel-mean SQNR, dB |"
          " per-tensor INT8 top-1 | FP32 top-1 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['rule']} | {r['layers_fell']}/{r['layers']} | "
              f"{r['lowest_channel_sqnr']:.1f} | {100 * r['int8_top1']:.2f} | "
              f"{100 * r['fp32_top1']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
