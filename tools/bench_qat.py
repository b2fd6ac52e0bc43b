"""QAT on the shipped MobileOne: FP32, PTQ per-tensor and 1-epoch QAT with and without BN restore.

Builds the full Fashion-MNIST training set (60k) and test set (10k) as .npz files in a temp
dir, with the preprocessing models/fmnist_eval.npz records (x = (u8 * scale - mean) / std).
Calibration: models/fmnist_calib.npz (512 training images), for PTQ and QAT alike. Each QAT run
uses the same seed, data order and hyper-parameters; only --restore-bn differs. Prints a
markdown table: top-1 on the 10k test set, change vs FP32, training time and throughput, and
the SQNR of the exported model's logits in onnxruntime (int8 kernels) against the trained torch
fake-quant model's logits over the test set ("what was trained is what is deployed"). --plot
writes the loss curves.

usage: python tools/bench_qat.py [--model models/mobileone_fmnist.onnx] [--epochs 1]
           [--plot qat_loss.png] [--per-channel] [--reduce-range] [--limit-train N]
           [--lr LR] [--batch-size N] [--freeze-bn-after K]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from models import fmnist  # noqa: E402
from onnxrep.cli.common import steps_or_never  # noqa: E402
from onnxrep.evaluation import evaluate  # noqa: E402
from onnxrep.ir.model import load  # noqa: E402
from onnxrep.progress import log  # noqa: E402
from onnxrep.ptq.quantizer import QuantizeConfig, quantize  # noqa: E402
from onnxrep.training.config import QATConfig  # noqa: E402
from onnxrep.verify import metrics, run, session  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "mobileone_fmnist.onnx"))
    p.add_argument("--calib", default=str(ROOT / "models" / "fmnist_calib.npz"))
    p.add_argument("--data-dir", default=fmnist.DEFAULT_DATA_DIR)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, help="default: QATConfig's")
    p.add_argument("--batch-size", type=int, help="default: QATConfig's")
    p.add_argument("--freeze-bn-after", type=steps_or_never, default=QATConfig.freeze_bn_after,
                   metavar="K|never", help="default: QATConfig's")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--reduce-range", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--limit-train", type=int, help="smoke runs: first N training images")
    p.add_argument("--plot", help="PNG of the loss curves")
    return p.parse_args(argv)


def write_split(split: str, path: Path, data_dir: str, limit: int | None = None) -> Path:
    images, labels = fmnist.load_split(split, data_dir)
    if limit:
        images, labels = images[:limit], labels[:limit]
    np.savez(path, input=images, labels=labels, preprocess_scale=np.float32(fmnist.SCALE),
             preprocess_mean=np.float32(fmnist.MEAN), preprocess_std=np.float32(fmnist.STD))
    return path


def fidelity_on(result, test: Path):
    """onnxruntime's int8 logits vs the torch fake-quant logits over all test images
    (:class:`onnxrep.verify.OutputMetrics`: SQNR, top-1 agreement, ...)."""
    import torch

    with np.load(test) as z:
        x = fmnist.preprocess(z["input"])
    sess = session(result.model, optimized=True)
    trained, deployed = [], []
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            batch = x[start:start + 1000]
            trained.append(result.net(torch.from_numpy(batch)).numpy())
            deployed.append(run(sess, {"input": batch})["logits"])
    return metrics(np.concatenate(trained), np.concatenate(deployed))


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in runs.items():
        loss = np.array([h.loss for h in result.history])
        window = max(1, min(50, len(loss) // 10))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(loss)) + 1, loss, alpha=0.25)
        ax.plot(np.arange(len(smooth)) + window, smooth, label=f"{name} ({window}-step mean)",
                color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from onnxrep.training.train import qat_with_details

    if args.threads:
        torch.set_num_threads(args.threads)

    model = load(args.model)
    with np.load(args.calib) as z:
        calib = {"input": z["input"]}
    overrides = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size),
                                   ) if v is not None}
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxrep-bench-qat-") as tmp:
        train = write_split("train", Path(tmp) / "train.npz", args.data_dir, args.limit_train)
        test = write_split("test", Path(tmp) / "test.npz", args.data_dir)
        fp32 = evaluate(model, test, batch_size=500)
        rows.append(["FP32", fp32.top1, None, None, None, None])
        log("bench: PTQ per-tensor")
        ptq = evaluate(quantize(model, calib, QuantizeConfig()), test, batch_size=500)
        rows.append(["PTQ per-tensor (`onnxrep quantize`)", ptq.top1, None, None, None, None])
        runs = {}
        for restore in (True, False):
            name = f"QAT {args.epochs} ep, {'restored BN' if restore else 'no BN restore'}"
            log(f"bench: {name}")
            config = QATConfig(epochs=args.epochs, per_channel=args.per_channel,
                               reduce_range=args.reduce_range, restore_bn=restore,
                               seed=args.seed, freeze_bn_after=args.freeze_bn_after,
                               **overrides)
            result = qat_with_details(model, train, config=config, calib=calib)
            runs[name] = result
            score = evaluate(result.model, test, batch_size=500)
            rows.append([name, score.top1, result.train_seconds, result.samples_per_second,
                         fidelity_on(result, test), result.seconds])
        if args.plot:
            plot(runs, args.plot)
    import torch

    kind = ("per-channel" if args.per_channel else "per-tensor") + (
        ", 7-bit weights" if args.reduce_range else "")
    print(f"\n{Path(args.model).name}, QAT weights {kind}, 10k test images, "
          f"{torch.get_num_threads()} torch thread(s)\n")
    print(markdown(rows, fp32.top1))
    if args.plot:
        print(f"\nloss curves: {args.plot}")
    return 0


def markdown(rows, base) -> str:
    lines = ["| model | top-1 % | vs FP32 | training time | samples/s | deployed vs trained: "
             "SQNR, top-1 agreement | total time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, top1, train_s, rate, fid, total in rows:
        delta = "" if name == "FP32" else f"{100 * (top1 - base):+.2f} pp"
        agree = "" if fid is None else (f"{_opt(fid.sqnr_db, '{:.1f} dB')}, "
                                         f"{100 * fid.top1_agreement:.2f} %")
        lines.append(f"| {name} | {100 * top1:.2f} | {delta} | "
                     f"{_opt(train_s, '{:.0f} s')} | {_opt(rate, '{:.0f}')} | {agree} | "
                     f"{_opt(total, '{:.0f} s')} |")
    return "\n".join(lines)


def _opt(value, form: str) -> str:
    if value is None:
        return ""
    return "inf" if isinstance(value, float) and math.isinf(value) else form.format(value)


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    log(f"bench: {time.monotonic() - start:.0f} s")
    sys.exit(code)
