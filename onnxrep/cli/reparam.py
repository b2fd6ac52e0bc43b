"""Merge the branches of re-parameterizable blocks (train form) into one Conv each (deploy form).

Finds sums (Add trees, Sum) whose branches all read one tensor, each a Conv (with its
BatchNormalization, or a 1x1 -> kxk sequence, or an AveragePool), a BatchNormalization of the
tensor or the tensor itself: RepVGG, MobileOne, ACNet, DBB, QARepVGG, RepViT and PP-LCNetV3
blocks as exported from their training form. Each becomes one Conv with bias, smaller kernels
zero-padded at the centre, the identity as an identity kernel, BNs and a BN or scalar /
per-channel Mul/Add after the sum folded in (float64). A block that does not merge exactly is
left alone and listed with the reason. The result is checked against the input with
onnxruntime on seeded random inputs (exit 3 and nothing written past --rtol). Default output:
<stem>.deploy.onnx.

example: onnxrep reparam repvgg.train.onnx -o repvgg.deploy.onnx
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from onnxrep.cli.common import add_single_pass, emit_json, run_single_pass
from onnxrep.passes.base import Stage
from onnxrep.passes.reparameterize import Reparameterize
from onnxrep.report import table


def register(p: argparse.ArgumentParser) -> None:
    add_single_pass(p, "deploy")


def run(args: argparse.Namespace) -> int:
    stage = Stage("reparameterize", lambda m, s: Reparameterize())
    out, result, comparison = run_single_pass(args, stage)
    info = result.summary
    if args.json:
        emit_json("reparam", {
            "input": args.model, "output": str(out),
            "blocks": [{k: v for k, v in asdict(b).items() if k != "detail"}
                       for b in info.blocks],
            "skipped": [vars(s) for s in result.skips],
            "convs": {"before": info.convs_before, "after": info.convs_after},
            "batchnorms": {"before": info.bns_before, "after": info.bns_after},
            "verification": comparison.as_dict() if comparison else None})
        return 0
    if info.blocks:
        rows = [[b.conv, b.branches + (" then " + ", ".join(b.after) if b.after else ""),
                 b.kernel, b.groups, f"{b.convs_before} -> {b.convs_after}"]
                for b in info.blocks]
        print(table(["merged Conv", "branches merged", "kernel", "groups", "Convs"], rows,
                    "llrrr"))
    if result.skips:
        print(f"\nnot merged ({len(result.skips)}):")
        print(table(["block (root)", "reason"], [[s.node, s.reason] for s in result.skips],
                    "ll"))
    if not info.blocks and not result.skips:
        print("no re-parameterizable block found (no sum of branches of one tensor)")
    verified = f"verified: {comparison.summary()}" if comparison else "not verified"
    print(f"\nmerged {info.merged} block(s), {len(result.skips)} left; Convs "
          f"{info.convs_before} -> {info.convs_after}, BatchNormalization "
          f"{info.bns_before} -> {info.bns_after}; {verified}; wrote {out}")
    return 0
