"""Equalize a deploy-form Rep model so it quantizes well; the output is verified equivalent.

Runs cross-layer equalization on Conv/Gemm/MatMul weights, checks with onnxruntime that the
outputs did not change beyond --rtol (exit 3 and nothing written otherwise), writes the model
and prints a per-layer before/after table of max |w|, per-tensor spread and INT8 weight SQNR.

example: onnxrep optimize models/mobileone_fmnist.onnx -o mobileone.opt.onnx
"""

from __future__ import annotations

import argparse

from onnxrep.cli.common import (add_input_shape, add_output, add_reporting, emit_json,
                                output_path, parse_input_shapes)
from onnxrep.errors import InputError
from onnxrep.optimize import Optimized, OptimizeConfig, optimize_file
from onnxrep.passes.equalize import EqualizeConfig
from onnxrep.progress import log
from onnxrep.report import fmt, table


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, "opt")
    defaults = EqualizeConfig()
    p.add_argument("--iterations", type=int, default=defaults.iterations,
                   help="maximum CLE rounds (default %(default)s; stops earlier on convergence)")
    p.add_argument("--tolerance", type=float, default=defaults.tolerance,
                   help="CLE convergence: stop when no scale moves more than this "
                        "(default %(default)s)")
    p.add_argument("--threshold", type=float, default=defaults.threshold,
                   help="leave a channel unscaled when r1 + r2 is below this "
                        "(default %(default)s)")
    p.add_argument("--max-scale", type=float, default=defaults.max_scale,
                   help="clamp each round's scale to [1/x, x] (default %(default)g)")
    p.add_argument("--rtol", type=float, default=OptimizeConfig.rtol,
                   help="largest relative output error accepted (default %(default)g)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare outputs before/after with onnxruntime (default on)")
    add_input_shape(p)
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    out = output_path(args)
    try:
        equalize = EqualizeConfig(args.iterations, args.tolerance, args.threshold, args.max_scale)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    config = OptimizeConfig(equalize=equalize, verify=args.verify, rtol=args.rtol,
                            input_shapes=parse_input_shapes(args.input_shape))
    log(f"optimizing {args.model}")
    result = optimize_file(args.model, out, config, force=args.force, progress=log)
    if args.json:
        emit_json("optimize", as_json(result, args.model, out))
    else:
        print(layer_table(result.before, result.after))
        print()
        print(summary(result, out))
    return 0


def layer_table(before, after) -> str:
    """Rows matched by node name: max |w|, spread and INT8 SQNR, before -> after."""
    after_by = {s.node: s for s in after}
    rows = []
    for b in before:
        a = after_by.get(b.node, b)
        flag = "!" if a.outlier else ("*" if b.outlier else "")
        rows.append([b.node, b.op, f"{fmt(b.max_abs)} -> {fmt(a.max_abs)}",
                     f"{fmt(b.spread)} -> {fmt(a.spread)}",
                     f"{b.sqnr_db:.1f} -> {a.sqnr_db:.1f}", flag])
    return table(["layer", "op", "max|w|", "spread", "int8 SQNR dB", ""], rows, "llrrrl")


def summary(result: Optimized, out) -> str:
    eq = dict(result.results)["equalize"]
    worst_b = max((s.spread for s in result.before), default=1.0)
    worst_a = max((s.spread for s in result.after), default=1.0)
    verified = (f"verified: {result.comparison.summary()}" if result.comparison
                else "not verified")
    return (f"equalized {len(eq.changes)}/{eq.info['pairs']} pairs in {eq.info['rounds']} rounds"
            f"{'' if eq.info['converged'] else ' (not converged)'}, {len(eq.skips)} layers "
            f"skipped; worst spread {fmt(worst_b)} -> {fmt(worst_a)}; {verified}; wrote {out}")


def as_json(result: Optimized, src, out) -> dict:
    after_by = {s.node: s for s in result.after}
    return {
        "input": str(src), "output": str(out),
        "passes": [{"name": name, "changes": [vars(c) for c in r.changes],
                    "skips": [vars(s) for s in r.skips], "info": r.info}
                   for name, r in result.results],
        "layers": [{"node": b.node, "before": b.as_dict(),
                    "after": after_by.get(b.node, b).as_dict()} for b in result.before],
        "verification": result.comparison.as_dict() if result.comparison else None,
    }
