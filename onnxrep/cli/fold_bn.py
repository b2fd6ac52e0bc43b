"""Fold every inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

W' = W * gamma / sqrt(var + eps) per output channel and b' = (b - mean) * gamma /
sqrt(var + eps) + beta, in float64; works for grouped convs, convs without bias and opsets
11..latest. A BN is left in place, with the reason printed, when its layer's output has other
readers, a weight is shared or not constant, or it runs in training mode. The result is checked
against the input with onnxruntime on seeded random inputs (exit 3 and nothing written past
--rtol). Default output: <stem>.folded.onnx.

example: onnxrep fold-bn mobileone.bn.onnx -o mobileone.folded.onnx
"""

from __future__ import annotations

import argparse

from onnxrep import verify
from onnxrep.cli.common import (tolerance, add_input_shape, add_output, add_reporting, emit_json, output_path, parse_input_shapes)
from onnxrep.ir.model import load, save
from onnxrep.passes.base import PassManager, Stage, Verifier
from onnxrep.passes.fold_affine import FoldBatchNorm
from onnxrep.report import table


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, "folded")
    p.add_argument("--rtol", type=tolerance, default=1e-5,
                   help="largest relative output error accepted (default %(default)g)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare outputs before/after with onnxruntime (default on)")
    add_input_shape(p)
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    out = output_path(args)
    model = load(args.model)
    verifier = None
    if args.verify:
        feeds = verify.random_inputs(model, parse_input_shapes(args.input_shape))
        verifier = Verifier(model, feeds, rtol=args.rtol, bounds=verify.output_bounds(model))
    stages = [Stage("fold-bn", lambda m, s: FoldBatchNorm())]
    done = PassManager(stages, verifier=verifier).run(model)  # in place: the file is the original
    (_, result), comparison = done.results[0], done.comparison
    if verifier is not None and comparison is None:  # nothing folded: exact
        comparison = verify.compare_outputs(verifier.reference, verifier.reference)
    save(model, out, force=args.force)
    if args.json:
        emit_json("fold-bn", {
            "input": args.model, "output": str(out),
            "folded": [{"bn": c.nodes[0], "into": c.nodes[1], "detail": c.detail}
                       for c in result.changes],
            "skipped": [vars(s) for s in result.skips],
            "verification": comparison.as_dict() if comparison else None})
        return 0
    if result.changes:
        print(table(["BatchNormalization", "folded into", ""],
                    [[c.nodes[0], c.nodes[1], c.detail] for c in result.changes], "lll"))
    if result.skips:
        print(f"\nnot folded ({len(result.skips)}):")
        print(table(["BatchNormalization", "reason"], [[s.node, s.reason] for s in result.skips],
                    "ll"))
    verified = f"verified: {comparison.summary()}" if comparison else "not verified"
    print(f"\nfolded {len(result.changes)} BatchNormalization node(s), {len(result.skips)} left; "
          f"{verified}; wrote {out}")
    return 0
