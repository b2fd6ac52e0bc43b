"""Make a deploy-form Rep model quantize well; every pass is verified before anything is written.

Folds BatchNormalization and Mul/Add/Sub/Div by per-channel constants into the layers before
them, equalizes Conv/Gemm/MatMul weights across layers (CLE) and checks with onnxruntime
that the outputs did not change beyond --rtol (exit 3 and nothing written otherwise). With --calib it also measures every ReLU's pre-activation:
weights that only ever multiply a channel that never fires are zeroed (the huge merged weights
of dead channels), and channels that never go negative have their bias absorbed into the next
layer; both are exact on the calibration data and checked over all of it. Without data,
--input-range=LO,HI proves dead channels by interval arithmetic instead. Prints a per-layer
before/after table of max |w|, per-tensor spread and INT8 weight SQNR.

example: onnxrep optimize models/mobileone_fmnist.onnx --calib models/fmnist_calib.npz
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict

from onnxrep.cli.common import (add_calib, add_input_shape, add_output, add_reporting, bounded,
                                calib_dataset, emit_json, nonnegative_float, nonnegative_int,
                                output_path, parse_input_shapes, tolerance)
from onnxrep.errors import InputError
from onnxrep.pipeline import Optimized, OptimizeConfig, optimize_file
from onnxrep.passes.equalize import EqualizeConfig
from onnxrep.progress import log
from onnxrep.report import fmt, table


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, "opt")
    defaults = EqualizeConfig()
    p.add_argument("--iterations", type=nonnegative_int, default=defaults.iterations,
                   help="maximum CLE rounds (default %(default)s; stops earlier on convergence)")
    p.add_argument("--tolerance", type=nonnegative_float, default=defaults.tolerance,
                   help="CLE convergence: stop when no scale moves more than this "
                        "(default %(default)s)")
    p.add_argument("--threshold", type=nonnegative_float, default=defaults.threshold,
                   help="leave a channel unscaled when r1 + r2 is below this "
                        "(default %(default)s)")
    p.add_argument("--max-scale", type=bounded(float, lo=1), default=defaults.max_scale,
                   help="clamp each round's scale to [1/x, x] (default %(default)g)")
    p.add_argument("--rtol", type=tolerance, default=OptimizeConfig.rtol,
                   help="largest relative output error accepted (default %(default)g)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare outputs before/after with onnxruntime (default on)")
    p.add_argument("--strict", action="store_true",
                   help="exit 3 when a pass fails its check, instead of rolling back the units "
                        "(channels, pairs, folds) that break it and keeping the rest")
    add_calib(p, required=False)
    p.add_argument("--input-range", type=_range, metavar="LO,HI",
                   help="bounds of every float input (write --input-range=-1,1): proves dead "
                        "channels without data (default with --calib: the data's min/max)")
    for name, what in (("reparam", "merge train-form Rep blocks (parallel branches of one "
                                   "tensor) into one Conv each first"),
                       ("fold-bn", "fold BatchNormalization and Mul/Add/Sub/Div by per-channel "
                                   "constants into the layer before them first"),
                       ("dead-inputs", "zero weights reading dead channels"),
                       ("absorb-bias", "absorb high biases (needs --calib)")):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True,
                       help=f"{what} (default on)")
    add_input_shape(p)
    add_reporting(p)


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, e.g. -1,1; got '{text}'") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"expected finite LO < HI, got '{text}'")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    out = output_path(args)
    try:
        equalize = EqualizeConfig(args.iterations, args.tolerance, args.threshold, args.max_scale)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    try:
        config = OptimizeConfig(equalize=equalize, verify=args.verify, rtol=args.rtol,
                                input_shapes=parse_input_shapes(args.input_shape),
                                strict=args.strict, reparameterize=args.reparam,
                                fold_bn=args.fold_bn, dead_inputs=args.dead_inputs,
                                absorb_bias=args.absorb_bias, input_range=args.input_range,
                                batch_size=args.batch_size, calib_limit=args.calib_limit)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    log(f"optimizing {args.model}" + (f" with {args.calib}" if args.calib else ""))
    calib = calib_dataset(args, args.model) if args.calib else None
    result = optimize_file(args.model, out, config, calib=calib, force=args.force,
                           progress=log)
    nested = result.subgraph_layers
    if args.json:
        emit_json("optimize", {**as_json(result, args.model, out),
                               "skipped_subgraph_layers": [
                                   {"node": n, "where": w, "reason": SUBGRAPH_REASON}
                                   for n, w in nested]})
    else:
        if result.before:
            if result.folded:
                print("before = the deploy form: the input with its BatchNormalization and "
                      "per-channel affine ops folded (and train-form blocks merged), as every "
                      "INT8 flow quantizes it")
            print(layer_table(result.folded or result.before, result.after))
        else:
            print("nothing to equalize: the model has no Conv/ConvTranspose/Gemm/MatMul layer "
                  "with constant weights in its main graph")
        if nested:
            print()
            print(f"skipped {len(nested)} layer(s) inside subgraphs ({SUBGRAPH_REASON}):")
            print(table(["layer", "inside"], [list(r) for r in nested], "ll"))
        print()
        print(summary(result, out))
        fell = worse_layers(result)
        if fell and args.calib is None and args.input_range is None:
            print(f"note: {len(fell)} layer(s) lost per-channel SQNR (v): CLE traded them for "
                  "outlier layers; with --calib DATA (or --input-range LO,HI) the dead channels "
                  "behind such outliers are zeroed first, which leaves less to trade")
    return 0


def worse_layers(result: Optimized) -> list[str]:
    """Layers whose per-channel INT8 weight SQNR fell against the deploy form (the `v` flag)."""
    after = {s.node: s for s in result.after}
    return [b.node for b in result.folded or result.before
            if b.node in after and after[b.node].channel_sqnr_db < b.channel_sqnr_db - WORSE_DB]


WORSE_DB = 0.05  # a per-channel SQNR drop the table flags `v`
SUBGRAPH_REASON = "inside an If/Loop/Scan body: onnxrep's passes leave subgraphs unchanged"


def layer_table(before, after) -> str:
    """Rows matched by node name: max |w|, spread and INT8 SQNR (whole tensor, and the mean
    over channels the passes are judged by), before -> after; flags as the README says."""
    after_by = {s.node: s for s in after}
    rows = []
    for b in before:
        a = after_by.get(b.node, b)
        flag = "!" if a.outlier else ("*" if b.outlier else "")
        if a.channel_sqnr_db < b.channel_sqnr_db - WORSE_DB:
            flag += "v"
        rows.append([b.node, b.op, f"{fmt(b.max_abs)} -> {fmt(a.max_abs)}",
                     f"{fmt(b.spread)} -> {fmt(a.spread)}",
                     f"{b.sqnr_db:.1f} -> {a.sqnr_db:.1f}",
                     f"{b.channel_sqnr_db:.1f} -> {a.channel_sqnr_db:.1f}", flag])
    return table(["layer", "op", "max|w|", "spread", "int8 SQNR dB", "per channel", ""], rows,
                 "llrrrrl")


def summary(result: Optimized, out) -> str:
    passes = dict(result.results)
    eq = passes["equalize"]
    worst_b = max((s.spread for s in result.before), default=1.0)
    worst_f = max((s.spread for s in result.folded), default=1.0) if result.folded else None
    worst_a = max((s.spread for s in result.after), default=1.0)
    verified = (f"verified: {result.comparison.summary()}" if result.comparison
                else "not verified")
    if result.data_comparison:
        verified += f"; on all calibration data: {result.data_comparison.summary()}"
    lines = []
    if "reparameterize" in passes:
        r = passes["reparameterize"].summary
        lines.append(f"reparameterized {r.merged} train-form block(s) into one Conv each: Convs "
                     f"{r.convs_before} -> {r.convs_after}, BatchNormalization "
                     f"{r.bns_before} -> {r.bns_after}")
    if "fold-affine" in passes:
        r = passes["fold-affine"]
        lines.append(f"folded {r.summary.folded} per-channel affine op(s) (BatchNormalization, "
                     f"Mul/Add/Sub/Div by a constant) into the layer before them; "
                     f"{len(r.skips)} BatchNormalization left")
    if "dead-inputs" in passes:
        r, d = passes["dead-inputs"], passes["dead-inputs"].summary
        seen = f" on {d.samples} samples" if d.samples is not None else ""
        lines.append(f"dead inputs: {d.dead} dead and {d.constant} constant channel(s) "
                     f"({d.proven} proven, {d.observed} observed only{seen}); their weights "
                     f"zeroed (constants folded into biases) in {len(r.changes)} layer(s)")
    if "absorb-bias" in passes:
        r = passes["absorb-bias"]
        lines.append(f"absorbed high biases of {r.summary.channels} channel(s) in "
                     f"{len(r.changes)} layer pair(s), {len(r.skips)} pair(s) skipped")
    rolled = [(name, s) for name, r in result.results for s in r.skips
              if s.reason.startswith("rolled back:")]
    for name, s in rolled:
        lines.append(f"{name}: {s.node} {s.reason}")
    e = eq.summary
    lines.append(f"equalized {len(eq.changes)}/{e.pairs} pairs in {e.rounds} "
                 f"rounds{'' if e.converged else ' (not converged)'}, {len(eq.skips)} "
                 f"layers skipped; worst spread {fmt(worst_b)} -> "
                 + (f"{fmt(worst_f)} folded -> " if worst_f is not None else "")
                 + f"{fmt(worst_a)}; {verified}; "
                 f"wrote {out}")
    return "\n".join(lines)


def as_json(result: Optimized, src, out) -> dict:
    after_by = {s.node: s for s in result.after}
    folded_by = {s.node: s for s in result.folded or []}
    return {
        "input": str(src), "output": str(out),
        "passes": [{"name": name, "changes": [vars(c) for c in r.changes],
                    "skips": [vars(s) for s in r.skips],
                    "summary": asdict(r.summary) if r.summary is not None else None}
                   for name, r in result.results],
        "layers": [{"node": b.node, "before": b.as_dict(),
                    "folded": folded_by[b.node].as_dict() if b.node in folded_by else None,
                    "after": after_by.get(b.node, b).as_dict()} for b in result.before],
        "verification": result.comparison.as_dict() if result.comparison else None,
        "verification_on_data": (result.data_comparison.as_dict() if result.data_comparison
                                 else None),
    }
