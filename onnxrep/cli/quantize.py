"""Quantize a model to INT8 (QDQ) with onnxruntime, after onnxrep's equivalence-preserving passes.

Runs the optimize passes (unless --no-optimize), calibrates on --calib data (streamed, a few
batches at a time), corrects biases (kept only when that raises the output SQNR), optionally
keeps the most sensitive nodes in FP32, then writes a QDQ model that onnxruntime runs with
integer kernels (uint8 activations, int8 weights by default: onnxruntime's choice for x86 and
the fastest pair measured on AVX2 without VNNI). --eval prints FP32 and INT8 accuracy side by
side; --report prints the per-layer SQNR, worst first, split into weight and activation error.
Data that does not match the model's inputs exits 2 and writes nothing.

examples:
  onnxrep quantize models/repvgg_fmnist.onnx --calib models/fmnist_calib.npz \\
      --eval models/fmnist_eval.npz
  onnxrep quantize model.onnx --calib calib.npz --per-channel --exclude auto:2 --report
  onnxrep quantize model.onnx --calib calib.npz --method auto --min-sqnr 30
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from onnxrep.cli.common import (add_calib, add_input_shape, add_output, add_reporting, bounded,
                                calib_dataset, emit_json, nonnegative_float, output_path,
                                parse_input_shapes, positive_int, read_data, tolerance)
from onnxrep.errors import InputError
from onnxrep.evaluation import evaluate
from onnxrep.errors import UnsupportedModelError
from onnxrep.verify import check_weights, is_float16
from onnxrep.ir.model import check_output_path, load, save
from onnxrep.pipeline import OptimizeConfig
from onnxrep.progress import log
from onnxrep.ptq.targets import TARGETS
from onnxrep.ptq.quantizer import (ACTIVATION_TYPES, LEARNED_ROUNDINGS, METHODS, ROUNDINGS,
                                   WEIGHT_TYPES, QuantizeConfig, Quantized, has_torch,
                                   quantize_with_details)
from onnxrep.analysis.qdq import quantized_nodes
from onnxrep.ptq.mixed_precision import PRECISIONS
from onnxrep.report import table

_D = QuantizeConfig()


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, "int8")
    add_calib(p, required=True)
    p.add_argument("--target", choices=list(TARGETS), default=_D.profile.name,
                   help="the runtime the model is for: its QDQ placement, types and default "
                        "granularity (default %(default)s; openvino and tensorrt default to "
                        "per-channel)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="per-output-channel weight scales (default: the target's)")
    p.add_argument("--method", choices=METHODS, default=_D.method.value,
                   help="calibration method; auto: each activation tensor's range (minmax, "
                        "percentiles, MSE-optimal clipping) chosen by the error of the layers "
                        "that read it (default %(default)s)")
    p.add_argument("--percentile", type=bounded(float, lo=0, hi=100, lo_open=True), default=_D.percentile,
                   help="for --method percentile: share of |x| kept (default %(default)s)")
    p.add_argument("--activation-type", choices=ACTIVATION_TYPES,
                   help="default: the target's (onnxruntime, openvino uint8; tensorrt int8)")
    p.add_argument("--weight-type", choices=WEIGHT_TYPES, help="default: the target's (int8)")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="run onnxrep's equivalence-preserving passes first (default on)")
    p.add_argument("--reparam", action=argparse.BooleanOptionalAction, default=True,
                   help="merge train-form Rep blocks into one Conv each first (default on)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="NODE",
                   help="keep these nodes in FP32; 'auto' or 'auto:K' keeps the K (default 1) "
                        "most sensitive nodes of the per-layer report")
    p.add_argument("--max-drop", type=nonnegative_float, metavar="PP",
                   help="with --eval: raise nodes to a --fallback precision, most sensitive "
                        "first, until top-1 is within PP points of FP32")
    p.add_argument("--min-sqnr", type=bounded(float), metavar="DB",
                   help="no labels needed: raise nodes to a --fallback precision, most "
                        "sensitive first, until the output SQNR vs FP32 on the calibration "
                        "samples reaches DB")
    p.add_argument("--fallback", nargs="+", choices=PRECISIONS, metavar="P",
                   help="precisions tried per node by --max-drop/--min-sqnr, in order: int16 "
                        "(16-bit QDQ, opset 21), fp32 (default: int16 fp32 for the onnxruntime "
                        "target, fp32 for the others)")
    p.add_argument("--op-types", nargs="+", metavar="OP",
                   help="op types to quantize (default: the target's), or 'auto': the "
                        "target's plus those of LayerNorm/Softmax/GELU/HardSwish/Add/Mul/... "
                        "that do not lower the output SQNR on the calibration samples")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction,
                   default=_D.bias_correction,
                   help="empirical per-channel bias correction (default "
                        f"{'on' if _D.bias_correction else 'off'})")
    p.add_argument("--rounding", choices=ROUNDINGS, default=_D.rounding,
                   help="weight rounding: onnxruntime's nearest, learned (AdaRound, layer by "
                        "layer on the calibration samples; kept only when it raises the output "
                        "SQNR on held-out ones; needs torch), or block (the same, with a layer, "
                        "its activation and the next layer learned together: BRECQ) "
                        "(default %(default)s)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=False,
                   help="print the per-layer SQNR report, worst first")
    p.add_argument("--eval", metavar="DATA", help="labelled data: print FP32 vs INT8 accuracy")
    p.add_argument("--save-float", type=Path, metavar="PATH",
                   help="also write the FP32 model that was quantized (optimized, prepared, "
                        "bias-corrected): the reference a per-layer report needs later")
    p.add_argument("--calibration-chunk", type=positive_int, default=_D.calibration_chunk, metavar="N",
                   help="batches per calibrator call; bounds entropy/percentile memory "
                        "(default %(default)s)")
    p.add_argument("--analysis-samples", type=positive_int, default=_D.analysis_samples, metavar="N",
                   help="calibration samples used by --report, --exclude auto, --max-drop "
                        "and bias correction (default: as many as hold 2^21 input values, 8 to "
                        "256: 45 text lines of 48x320, 8 pages of 480x640)")
    p.add_argument("--rounding-samples", type=positive_int, default=_D.rounding_samples,
                   metavar="N",
                   help="calibration samples --rounding learned learns on, a quarter held out "
                        "(default: as many as hold 2^23 input values, 16 to 256, at least "
                        "--analysis-samples)")
    p.add_argument("--rtol", type=tolerance, default=_D.passes.rtol,
                   help="largest relative output error accepted from the FP32 passes before "
                        "quantization (default %(default)g: a tenth of the error of one "
                        "uint8 step over the output's range)")
    p.add_argument("--strict", action="store_true",
                   help="exit 3 when a pass fails its check, instead of rolling back the units "
                        "that break it")
    add_input_shape(p)
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    out = output_path(args)
    if args.save_float is not None:
        check_output_path(args.model, args.save_float, args.force)
        if args.save_float.resolve() == out.resolve():
            raise InputError("--save-float must differ from the output path")
    config = _config(args)
    if config.rounding in LEARNED_ROUNDINGS and not has_torch():
        raise InputError(f"--rounding {config.rounding} needs torch: pip install 'onnxrep[qat]'")
    model = load(args.model)
    check_weights(model)
    if is_float16(model):
        raise UnsupportedModelError(f"{args.model} is a float16 model; INT8 quantization and QAT "
                                    "need float32: convert it first (e.g. onnxconverter_common's "
                                    "float16.convert_float16_to_float32), then run this again")
    calib = calib_dataset(args, model)
    evaluation = read_data(args, args.eval, model) if args.eval else None
    if args.max_drop is not None and evaluation is None:
        raise InputError("--max-drop needs --eval DATA")
    if args.max_drop is not None and args.min_sqnr is not None:
        raise InputError("give --max-drop or --min-sqnr, not both")
    log(f"quantizing {args.model}")
    result = quantize_with_details(model, calib, config, evaluation=evaluation)
    scores = None
    if evaluation is not None:
        scores = (evaluate(model, evaluation), evaluate(result.model, evaluation, reference=model))
    began = time.monotonic()
    save(result.model, out, force=args.force)
    if args.save_float is not None:
        save(result.float_model, args.save_float, force=args.force)
    result.stages["save"] = time.monotonic() - began
    if args.json:
        emit_json("quantize", {**as_json(result, args.model, out, scores),
                               "unused_keys": list(calib.ignored)})
        return 0
    print(summary(result, args.model, out))
    if calib.ignored:
        print(f"not used from {args.calib}: {', '.join(calib.ignored)}")
    if scores:
        print()
        print(accuracy_table(*scores))
    if result.bias is not None:
        print()
        print(result.bias.summary())
    if result.rounding is not None:
        print()
        print(result.rounding.summary())
    for record in (result.ranges, result.op_types, result.precision):
        if record is not None:
            print()
            print(record.summary())
    if args.report and result.report is not None:
        print()
        print(result.report.table())
    return 0


def _config(args: argparse.Namespace) -> QuantizeConfig:
    names, auto = [], 0
    for item in args.exclude:
        if item == "auto" or item.startswith("auto:"):
            k = item.partition(":")[2] or "1"
            if not k.isdigit() or int(k) < 1:
                raise InputError(f"--exclude {item}: expected auto or auto:K with K >= 1")
            auto = int(k)
        else:
            names.append(item)
    passes = OptimizeConfig(input_shapes=parse_input_shapes(args.input_shape), rtol=args.rtol,
                            strict=args.strict, reparameterize=args.reparam)
    auto_ops = args.op_types == ["auto"]
    if args.op_types and "auto" in args.op_types and not auto_ops:
        raise InputError("--op-types: give 'auto' alone or a list of op types")
    try:
        return QuantizeConfig(target=args.target, per_channel=args.per_channel,
                              method=args.method,
                              activation_type=args.activation_type, weight_type=args.weight_type,
                              optimize=args.optimize, passes=passes, exclude=tuple(names),
                              auto_exclude=auto, max_drop=args.max_drop,
                              bias_correction=args.bias_correction, report=args.report,
                              percentile=args.percentile,
                              calibration_chunk=args.calibration_chunk,
                              analysis_samples=args.analysis_samples, rounding=args.rounding,
                              rounding_samples=args.rounding_samples,
                              min_sqnr=args.min_sqnr,
                              fallback=tuple(args.fallback) if args.fallback else None,
                              op_types=None if auto_ops or not args.op_types
                              else tuple(args.op_types), op_search=auto_ops)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def summary(result: Quantized, src, out) -> str:
    c, cal = result.config, result.calibration
    lines = [f"quantized {src} -> {out} for {c.profile.name}: "
             f"{'per-channel' if c.per_channel else 'per-tensor'}, "
             f"{c.method.value}, {c.activation_type.value} activations / "
             f"{c.weight_type.value} weights, "
             f"{len(quantized_nodes(result.model))} nodes quantized, "
             f"{len(result.excluded)} kept in FP32"
             + (f" ({', '.join(result.excluded)})" if result.excluded else "")
             + f"; calibrated on {cal.samples} samples in {cal.seconds:.1f} s; "
             f"total {result.seconds:.1f} s"]
    lines.append("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.stages.items()))
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def accuracy_table(fp32, int8) -> str:
    rows = []
    for k in sorted(set(fp32.accuracy) | set(int8.accuracy)):
        a, b = fp32.accuracy.get(k), int8.accuracy.get(k)
        rows.append([f"top-{k}", _pct(a), _pct(b),
                     f"{100 * (b - a):+.2f} pp" if a is not None and b is not None else "-"])
    fid = next(iter(int8.fidelity.values())) if int8.fidelity else None
    text = table(["", "FP32", "INT8", "INT8 - FP32"], rows, "lrrr") if rows else \
        "accuracy: " + "; ".join(int8.skipped)
    if fid is not None:
        agree = (f", top-1 agreement {100 * fid.top1_agreement:.2f}%"
                 if fid.top1_agreement is not None else "")
        text += (f"\nINT8 vs FP32 on {int8.samples} samples: output SQNR {fid.sqnr_db:.1f} dB"
                 f"{agree}")
    return text


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def as_json(result: Quantized, src, out, scores) -> dict:
    config = asdict(result.config)
    return {
        "input": str(src), "output": str(out), "config": config,
        "calibration": vars(result.calibration), "excluded": list(result.excluded),
        "quantized_nodes": quantized_nodes(result.model), "notes": result.notes,
        "seconds": result.seconds, "stages": result.stages,
        "evaluation": None if scores is None else {"fp32": scores[0].as_dict(),
                                                   "int8": scores[1].as_dict()},
        "bias_correction": result.bias.as_dict() if result.bias is not None else None,
        "report": result.report.as_dict() if result.report is not None else None,
        "rounding": result.rounding.as_dict() if result.rounding is not None else None,
        "ranges": result.ranges.as_dict() if result.ranges is not None else None,
        "op_types": result.op_types.as_dict() if result.op_types is not None else None,
        "mixed_precision": (result.precision.as_dict() if result.precision is not None
                            else None),
    }
