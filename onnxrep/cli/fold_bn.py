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

from onnxrep.cli.common import add_single_pass, emit_json, run_single_pass
from onnxrep.passes.base import Stage
from onnxrep.passes.fold_affine import FoldBatchNorm
from onnxrep.report import table


def register(p: argparse.ArgumentParser) -> None:
    add_single_pass(p, "folded")


def run(args: argparse.Namespace) -> int:
    stage = Stage("fold-bn", lambda m, s: FoldBatchNorm())
    out, result, comparison = run_single_pass(args, stage)
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
