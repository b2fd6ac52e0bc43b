"""Insert a BatchNormalization after each Conv, carrying the exact statistics of its output.

Measures the per-channel mean and variance of each selected Conv's output over --calib data
(one streaming onnxruntime pass, float64, exact statistics rather than a moving average) and
inserts BN(y) = (y - mean) / sqrt(var + eps) * sqrt(var + eps) + mean, which is y: the function
is unchanged (checked over all the calibration data: exit 3 and nothing written past --rtol),
while every BN carries its layer's statistics for QAT or BN re-estimation. `onnxrep fold-bn`
folds them back. Default output: <stem>.bn.onnx.

example: onnxrep restore-bn models/mobileone_fmnist.onnx --calib models/fmnist_calib.npz
"""

from __future__ import annotations

import argparse

from onnxrep.cli.common import (nonnegative_float, positive_int, tolerance, add_calib, add_output, add_reporting, calib_dataset, emit_json, output_path)
from onnxrep.errors import InputError
from onnxrep.ir.model import load, save
from onnxrep.pipeline import Restored, restore_bn_with_details
from onnxrep.progress import log
from onnxrep.report import table


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, "bn")
    add_calib(p, required=True)
    p.add_argument("--layers", metavar="NAME,...", type=lambda s: [n for n in s.split(",") if n],
                   help="only these Conv nodes (default: every Conv)")
    p.add_argument("--eps", type=nonnegative_float, default=1e-5, help="BN epsilon (default %(default)g)")
    p.add_argument("--rtol", type=tolerance, default=1e-5,
                   help="largest relative output error accepted on the calibration data "
                        "(default %(default)g)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="processes for the statistics pass (default 1)")
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    out = output_path(args)
    if not args.eps > 0 or args.workers < 1:
        raise InputError("--eps must be positive and --workers at least 1")
    model = load(args.model)
    dataset = calib_dataset(args, model)
    log(f"measuring conv outputs of {args.model} on {args.calib}")
    restored = restore_bn_with_details(model, dataset, args.layers, args.eps, rtol=args.rtol,
                                       workers=args.workers)
    save(restored.model, out, force=args.force)
    if args.json:
        emit_json("restore-bn", as_json(restored, args.model, out))
        return 0
    rows = []
    for change in restored.result.changes:
        rows.append([change.nodes[0], change.detail])
    if rows:
        print(table(["conv", "restored BN"], rows, "ll"))
    if restored.result.skips:
        print(f"\nnot restored ({len(restored.result.skips)}):")
        print(table(["conv", "reason"], [[s.node, s.reason] for s in restored.result.skips],
                    "ll"))
    cmp = restored.comparison
    verified = (f"verified on the calibration data (rtol {args.rtol:g}): {cmp.summary()}"
                if cmp else "not verified")
    print(f"\nrestored {len(restored.result.changes)} BatchNormalization node(s) from "
          f"{restored.stats.samples} samples; {verified}; wrote {out}")
    return 0


def as_json(restored: Restored, src, out) -> dict:
    graph = restored.model.graph
    bns = {n.input[0]: n for n in graph.node if n.op_type == "BatchNormalization"}
    layers = []
    for node in graph.node:
        if node.op_type == "Conv" and node.output[0] in bns:
            bn = bns[node.output[0]]
            s = restored.stats[bn.output[0]]
            layers.append({"conv": node.name or None, "bn": bn.name, "tensor": bn.output[0],
                           "channels": s.channels, "mean": s.mean.tolist(),
                           "var": s.var.tolist()})
    return {"input": str(src), "output": str(out), "samples": restored.stats.samples,
            "layers": layers, "skipped": [vars(s) for s in restored.result.skips],
            "verification": restored.comparison.as_dict() if restored.comparison else None}
