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

from onnxrep.data.readers import ImageOptions, load_data
from onnxrep.cli.common import (BATCH_HELP, add_reporting, emit_json, positive_float,
                                positive_int)
from onnxrep.errors import InputError
from onnxrep.evaluation import EvalResult, evaluate
from onnxrep.ir.model import check_input_file, load
from onnxrep.progress import log
from onnxrep.report import fmt, table
from onnxrep.runtime import RUNTIMES

_IMAGE_FLAGS = ("resize", "mean", "std", "scale", "layout", "grayscale")


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
    g = p.add_argument_group("image folders (defaults: the model's size, layout and channels)")
    g.add_argument("--resize", type=_size, metavar="HxW", help="resize images to H x W")
    g.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help="subtracted after scaling, one value or one per channel (default 0)")
    g.add_argument("--std", type=_floats, metavar="S[,S,S]",
                   help="divides after subtracting the mean (default 1)")
    g.add_argument("--scale", type=positive_float, help="pixel multiplier (default 1/255)")
    g.add_argument("--layout", choices=("NCHW", "NHWC"))
    color = g.add_mutually_exclusive_group()
    color.add_argument("--grayscale", dest="grayscale", action="store_const", const=True,
                       help="read images as one channel")
    color.add_argument("--rgb", dest="grayscale", action="store_const", const=False,
                       help="read images as three channels")
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    model = load(args.model)
    if args.reference:
        check_input_file(args.reference, "an .onnx file")
    dataset = load_data(args.data, model, batch_size=args.batch_size, limit=args.limit,
                        image_options=_image_options(args))
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


def _image_options(args: argparse.Namespace) -> ImageOptions | None:
    given = {k: getattr(args, k) for k in _IMAGE_FLAGS if getattr(args, k) is not None}
    if not given:
        return None
    try:
        return ImageOptions(**given)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HxW such as 224x224, got '{text}'")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
        if all(math.isfinite(v) for v in values):
            return values
        raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got '{text}'") from None
