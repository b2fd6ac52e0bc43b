"""Evaluate a model on data: top-1/top-5 accuracy, throughput, and fidelity to a reference.

DATA is an .npz (one array per input keyed by input name, first axis = samples, optional
`labels`; uint8 images with preprocess_scale/_mean/_std keys become (u8*scale - mean)/std), an
.npy (single-input models) or a folder of images (needs pillow; class subfolders give labels
in sorted name order; pixels become (p*scale - mean)/std, see the image options). With
--reference (e.g. the FP32 model when evaluating an INT8 one) every output is also compared
over the whole set: max abs and relative error, SQNR, cosine, top-1 agreement. The model runs
in --runtime (onnxruntime with graph optimizations on, or openvino: the accuracy of the runtime
you deploy with), the reference in onnxruntime; samples/s counts the model's own run time.

example: onnxrep eval models/mobileone_fmnist.onnx --data models/fmnist_eval.npz
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from onnxrep.cli.common import (BATCH_HELP, add_image_options, add_reporting, emit_json,
                                positive_int, read_data)
from onnxrep.evaluation import EvalResult, evaluate
from onnxrep.ir.model import check_input_file, load
from onnxrep.progress import log
from onnxrep.report import fmt, table
from onnxrep.runtime import RUNTIMES

def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model to evaluate")
    p.add_argument("--data", required=True, help=".npz, .npy or folder of images")
    p.add_argument("--reference", metavar="REF.onnx",
                   help="compare every output to this model's (e.g. the FP32 original)")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help=BATCH_HELP)
    p.add_argument("--limit", type=positive_int, metavar="N", help="evaluate only the first N samples")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="where the model runs (default onnxruntime; openvino needs "
                        "pip install 'onnxrep[openvino]')")
    add_image_options(p)
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    model = load(args.model)
    if args.reference:
        check_input_file(args.reference, "an .onnx file")
    dataset = read_data(args, args.data, model, limit=args.limit)
    log(f"evaluating {args.model} on {args.data}"
        + (f" against {args.reference}" if args.reference else ""))
    result = evaluate(model, dataset, reference=args.reference, runtime=args.runtime)
    if args.json:
        emit_json("eval", {"model": args.model, "data": args.data, "runtime": args.runtime,
                           "reference": args.reference, "unused_keys": list(dataset.ignored),
                           **result.as_dict()})
        return 0
    print(table(["metric", "value"], _metric_rows(result), "lr"))
    if result.fidelity:
        print()
        print(table(["output", "max abs err", "rel err", "SQNR dB", "cosine", "top-1 agree"],
                    [[name, fmt(m.max_abs), fmt(m.rel), f"{m.sqnr_db:.1f}", f"{m.cosine:.6f}",
                      "-" if m.top1_agreement is None else f"{m.top1_agreement:.4f}"]
                     for name, m in result.fidelity.items()]))
    for reason in result.skipped:
        print(f"skipped {reason}")
    if dataset.ignored:
        print(f"not used from {args.data}: {', '.join(dataset.ignored)}")
    print()
    print(summary(result, args.model, args.reference))
    return 0


def summary(result: EvalResult, model: str, reference: str | None) -> str:
    """``model.onnx: top-1 0.9123 top-5 0.9980 on 2000 samples (1234 samples/s)``."""
    scores = " ".join(f"top-{k} {v:.4f}" for k, v in result.accuracy.items())
    text = (f"{Path(model).name}: {scores + ' on ' if scores else ''}{result.samples} samples "
            f"({_rate(result)} samples/s)")
    if result.fidelity:
        worst = min(result.fidelity.items(), key=lambda kv: kv[1].sqnr_db)
        agree = worst[1].top1_agreement
        text += (f"; vs {Path(reference).name}: SQNR {worst[1].sqnr_db:.1f} dB"
                 + ("" if agree is None else f", top-1 agreement {agree:.4f}"))
    return text


def _metric_rows(result: EvalResult) -> list[list]:
    rows = [["samples", result.samples]]
    rows += [[f"top-{k}", f"{v:.4f}"] for k, v in result.accuracy.items()]
    return rows + [["seconds", f"{result.seconds:.3f}"], ["samples/s", _rate(result)]]


def _rate(result: EvalResult) -> str:
    rate = result.samples_per_second
    return "inf" if math.isinf(rate) else f"{rate:.0f}"
