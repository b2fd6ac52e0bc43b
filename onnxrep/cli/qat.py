"""Quantization-aware training: fine-tune with INT8 fake quantization, write a QDQ model.

Starts from what `onnxrep quantize` makes of the model (its equivalence-preserving passes and
bias-corrected biases; --no-from-ptq: the passes alone), restores BatchNormalization after each
Conv from the calibration statistics, converts to torch (checked against onnxruntime, --rtol),
places and rounds fake quantization as `onnxrep quantize --target` places Q/DQ (onnxruntime,
openvino: uint8 activations, int8 weights, outputs quantized; tensorrt: int8 symmetric on op
inputs, float biases, checked against TensorRT's rules, exit 3 if one breaks), trains
(cross-entropy on the data's labels; distillation from the FP32 model when it has none; AdamW
with steps relative to each tensor, calibrated ranges fixed), folds BN back and exports QDQ.
Distilling, it writes the QAT model only if it ends at least as close to FP32 on the
calibration data as the PTQ model it started from, else that PTQ model (--no-keep-better:
always the QAT model). --val prints FP32, PTQ (same target) and QAT INT8 top-1 side by side.
Needs torch (pip install 'onnxrep[qat]'). Launched with torchrun it trains with
DistributedDataParallel (gloo), each process on a slice of every batch.

Data (--data, --val, --calib): .npz (one array per input, optional `labels`, uint8 images with
preprocess_scale/mean/std), .npy, or a folder of images. Without --calib the first
--calib-samples training samples calibrate.

examples:
  onnxrep qat models/mobileone_fmnist.onnx --data train.npz --val models/fmnist_eval.npz
  onnxrep qat model.onnx --data train.npz --epochs 3 --checkpoint ckpt/ [--resume]
  onnxrep qat model.onnx --data train.npz --target tensorrt -o model.trt.onnx
  torchrun --nproc-per-node 2 -m onnxrep qat model.onnx --data train.npz -o model.qat.onnx
"""

from __future__ import annotations

import argparse

from onnxrep.errors import UnsupportedModelError
from onnxrep.verify import check_weights, is_float16
from onnxrep.cli.common import (add_image_options, add_output, add_reporting, bounded, emit_json,
                                nonnegative_int, output_path, positive_float, positive_int,
                                read_data, steps_or_never, tolerance)
from onnxrep.errors import InputError
from onnxrep.ir.model import load, save
from onnxrep.progress import log
from onnxrep.training.config import OPTIMIZERS, Distill, QATConfig
from onnxrep.ptq.targets import TARGETS
from onnxrep.report import table

_D = QATConfig()  # torch-free: --help and argument checks need no torch


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, "qat")
    p.add_argument("--data", required=True, metavar="TRAIN", help="training data")
    p.add_argument("--val", metavar="DATA", help="labelled data: FP32 / PTQ / QAT top-1")
    p.add_argument("--calib", metavar="DATA", help="calibration data (BN restore, ranges)")
    p.add_argument("--calib-samples", type=positive_int, default=_D.calib_samples, metavar="N",
                   help="without --calib: calibrate on the first N training samples "
                        "(default %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=_D.epochs,
                   help="default %(default)s")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=_D.optimizer,
                   help="adam: AdamW with each tensor's step lr x its RMS at the start (a "
                        "relative step); sgd: Nesterov momentum (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=_D.lr,
                   help="peak learning rate, cosine decay to 0 (default %(default)g)")
    p.add_argument("--momentum", type=bounded(float, lo=0, hi=1, hi_open=True), default=_D.momentum,
                   help="SGD momentum (default %(default)s)")
    p.add_argument("--range-averaging", type=bounded(float, lo=0, hi=1),
                   default=_D.averaging_constant, metavar="C",
                   help="activation ranges: 0 keeps the calibrated ones, C > 0 moves them by "
                        "an exponential average of each training batch's min/max (default "
                        "%(default)g)")
    p.add_argument("--batch-size", type=positive_int, default=_D.batch_size,
                   help="global batch size (default %(default)s)")
    p.add_argument("--target", choices=list(TARGETS), default=_D.profile.name,
                   help="the runtime the model is for: fake quantization and export place "
                        "and round Q/DQ as `onnxrep quantize --target` does (default "
                        "%(default)s; openvino and tensorrt default to per-channel)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="per-output-channel weight scales (default: the target's)")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=False,
                   help="7-bit weights: no int16 saturation in onnxruntime's u8s8 kernels on "
                        "CPUs without VNNI, so the deployed model computes what was trained")
    p.add_argument("--freeze-bn-after", type=steps_or_never, default=0, metavar="K|never",
                   help="after K steps, BNs use and keep their running statistics; never: "
                        "batch statistics throughout (default 0)")
    p.add_argument("--restore-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="insert BNs after the Convs before training (default on)")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="run onnxrep's equivalence-preserving passes (CLE, ...) first "
                        "(default on)")
    p.add_argument("--from-ptq", action=argparse.BooleanOptionalAction, default=_D.from_ptq,
                   help="start from `onnxrep quantize`'s model (its passes and bias-corrected "
                        "biases) (default on)")
    p.add_argument("--keep-better", action=argparse.BooleanOptionalAction,
                   default=_D.keep_better,
                   help="when distilling from a PTQ start, write the PTQ model instead if the "
                        "QAT model ends further from FP32 on the calibration data (default on)")
    p.add_argument("--distill", choices=("kl", "mse"),
                   help="distillation loss when the data has no labels (default: per output, "
                        "kl for Softmax probabilities and [N, K] logits, mse normalized by the "
                        "FP32 output's mean square otherwise)")
    p.add_argument("--seed", type=int, default=_D.seed, help="default %(default)s")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="write DIR/qat_checkpoint.pt after each epoch (and --checkpoint-every)")
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=0, metavar="N",
                   help="also checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the --checkpoint")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help="stop after N steps in all (checkpointed; resume later)")
    p.add_argument("--max-minutes", type=positive_float, metavar="M",
                   help="stop training after M minutes (wall clock, checked after each step), "
                        "checkpoint and export what it has")
    p.add_argument("--rtol", type=tolerance, default=_D.rtol,
                   help="largest relative torch vs onnxruntime error accepted before training "
                        "(default %(default)g; deep nets on real data may need 1e-4)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch threads (default: torch's choice; on a busy machine 1 per "
                        "process is often much faster)")
    p.add_argument("--ptq", action=argparse.BooleanOptionalAction, default=True,
                   help="with --val, also score `onnxrep quantize` per-tensor (default on)")
    add_image_options(p)
    add_reporting(p)


def run(args: argparse.Namespace) -> int:
    out = output_path(args)
    try:
        import torch
    except ImportError:
        raise InputError("qat needs torch: pip install 'onnxrep[qat]'") from None
    from onnxrep.training.train import is_main_process, qat_with_details

    if args.resume and not args.checkpoint:
        raise InputError("--resume needs --checkpoint DIR")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        config = QATConfig(epochs=args.epochs, optimizer=args.optimizer, lr=args.lr,
                           batch_size=args.batch_size, momentum=args.momentum,
                           averaging_constant=args.range_averaging, target=args.target,
                           per_channel=args.per_channel,
                           reduce_range=args.reduce_range,
                           restore_bn=args.restore_bn, optimize=args.optimize,
                           from_ptq=args.from_ptq, keep_better=args.keep_better,
                           freeze_bn_after=args.freeze_bn_after,
                           calib_samples=args.calib_samples,
                           distill=Distill(args.distill) if args.distill else None,
                           seed=args.seed, checkpoint_dir=args.checkpoint,
                           checkpoint_every=args.checkpoint_every, resume=args.resume,
                           max_steps=args.max_steps, max_minutes=args.max_minutes,
                           rtol=args.rtol)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    model = load(args.model)
    check_weights(model)
    if is_float16(model):
        raise UnsupportedModelError(f"{args.model} is a float16 model; INT8 quantization and QAT "
                                    "need float32: convert it first (e.g. onnxconverter_common's "
                                    "float16.convert_float16_to_float32), then run this again")
    val = read_data(args, args.val, model) if args.val else None
    calib = read_data(args, args.calib, model) if args.calib else None
    log(f"qat: {args.model}")
    train = read_data(args, args.data, model, batch_size=4096)  # held in memory, shuffled
    result = qat_with_details(model, train, config=config, calib=calib)
    if not is_main_process():
        return 0
    save(result.model, out, force=args.force)
    scores = _scores(model, result, val, args, config) if val is not None else None
    if args.json:
        emit_json("qat", as_json(result, args.model, out, scores))
        return 0
    print(summary(result, out))
    if scores:
        print()
        print(accuracy_table(scores))
    return 0


def _scores(model, result, val, args, config: QATConfig) -> dict:
    from onnxrep.evaluation import evaluate

    scores = {"FP32": evaluate(model, val)}
    if args.ptq:
        label = f"PTQ {'per-channel' if config.per_channel else 'per-tensor'}"
        ptq = result.ptq
        if ptq is None:
            from onnxrep.ptq.quantizer import QuantizeConfig, quantize

            log(f"qat: {label} (target {config.profile.name}) for comparison")
            ptq = quantize(model, result.calibration,
                           QuantizeConfig(target=config.target, per_channel=config.per_channel))
        scores[label] = evaluate(ptq, val, reference=model)
    scores["QAT INT8"] = evaluate(result.model, val, reference=model)
    return scores


def summary(result, out) -> str:
    last = result.history[-1] if result.history else None
    lines = [
        f"wrote {out}: {result.layers} layers with int8 weights, {result.activations} "
        f"quantized activations, {result.restored_bn} BatchNormalization restored and folded",
        f"trained {result.steps} steps ({result.samples} samples) in "
        f"{result.train_seconds:.1f} s ({result.samples_per_second:.0f} samples/s; "
        f"{result.seconds:.1f} s in all)"
        + (f"; last loss {last.loss:.4f}" if last else "")
        + (f", batch accuracy {100 * last.accuracy:.2f}%" if last and last.accuracy is not None
           else "")
        + (f"; resumed at step {result.resumed_from}" if result.resumed_from else ""),
        f"torch vs onnxruntime before training: {result.conversion.summary()}",
        f"deployed (onnxruntime int8) vs trained (torch fake-quant): "
        f"{result.deployment.summary()}",
    ]
    if result.choice is not None:
        lines.append(result.choice.summary())
    lines += [f"note: {s.node}: {s.reason}" for s in result.skips]
    return "\n".join(lines)


def accuracy_table(scores: dict) -> str:
    fp32 = scores["FP32"].top1
    rows = []
    for name, r in scores.items():
        fid = next(iter(r.fidelity.values())) if r.fidelity else None
        rows.append([name, _pct(r.top1),
                     "-" if r.top1 is None or fp32 is None or name == "FP32"
                     else f"{100 * (r.top1 - fp32):+.2f} pp",
                     "-" if fid is None else f"{fid.sqnr_db:.1f}",
                     f"{r.samples_per_second:.0f}"])
    return table(["model", "top-1 %", "vs FP32", "SQNR vs FP32 dB", "samples/s"], rows,
                 "lrrrr")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def as_json(result, src, out, scores) -> dict:
    return {
        "input": str(src), "output": str(out),
        "layers": result.layers, "activations": result.activations,
        "restored_bn": result.restored_bn, "steps": result.steps, "samples": result.samples,
        "seconds": result.seconds, "train_seconds": result.train_seconds,
        "samples_per_second": result.samples_per_second,
        "resumed_from": result.resumed_from,
        "history": [vars(h) for h in result.history],
        "conversion": result.conversion.as_dict(), "deployment": result.deployment.as_dict(),
        "skips": [vars(s) for s in result.skips],
        "choice": None if result.choice is None else result.choice.as_dict(),
        "evaluation": None if scores is None else {k: v.as_dict() for k, v in scores.items()},
    }
