"""Train a re-parameterizable CNN on Fashion-MNIST, reparameterize, export ONNX.

Run from the repository root:

    python -m models.train --arch mobileone
    python -m models.train --arch repvgg

Steps: seeded training on the 60k training set (per-epoch checkpoint in
--workdir, resumable with --resume), evaluation of the train form on the full
10k test set, reparameterization to the deploy form, train-vs-deploy check
(max |logit diff| over the test set must be <= --max-diff), ONNX export of the
deploy form (opset 17, input "input" [N,1,28,28] float32, output "logits"
[N,10], dynamic batch), ONNX Runtime check, and the weight statistics table
(models/WEIGHT_STATS.md + .json) plus models/TRAINING_RESULTS.json.

Progress: one line per epoch on stderr; a live step counter only if stderr is a TTY.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fmnist
from .mobileone import DEFAULT_CFG as MOBILEONE_CFG, mobileone_fmnist
from .repvgg import DEFAULT_CFG as REPVGG_CFG, repvgg_fmnist

MODELS_DIR = Path(__file__).resolve().parent

ARCHS = {
    "repvgg": (repvgg_fmnist, REPVGG_CFG),
    "mobileone": (mobileone_fmnist, MOBILEONE_CFG),
}

# Recipe defaults (identical for both archs unless overridden on the command line).
# These are the settings the shipped models were trained with (see models/README.md for the
# history: a gentler lr=0.1 / 100-step-warmup / random-flip recipe gave a MobileOne without
# any dead channels and hence without weight outliers).
DEFAULTS = dict(epochs=6, batch_size=256, lr=0.5, momentum=0.9, weight_decay=1e-4,
                warmup_steps=0, seed=0, threads=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak LR (SGD, Nesterov momentum)")
    p.add_argument("--momentum", type=float, default=DEFAULTS["momentum"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                   help="L2 weight decay on conv/linear weights only")
    p.add_argument("--bn-weight-decay", action="store_true",
                   help="also apply weight decay to BN gamma/beta and biases (NOT the paper recipe)")
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"])
    p.add_argument("--no-flip", dest="no_flip", action="store_true", default=True,
                   help="no augmentation (default)")
    p.add_argument("--flip", dest="no_flip", action="store_false",
                   help="enable random horizontal flip augmentation")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                   help="torch CPU threads; results are bit-reproducible only for the same value")
    p.add_argument("--workdir", default="/tmp/onnxrep-train", help="checkpoints/logs (outside git)")
    p.add_argument("--resume", action="store_true", help="continue from <workdir>/<arch>/last.pt")
    p.add_argument("--data-dir", default=fmnist.DEFAULT_DATA_DIR)
    p.add_argument("--out-dir", default=str(MODELS_DIR), help="where the .onnx and stats go")
    p.add_argument("--limit-train", type=int, default=0, help="smoke tests only: use first N train images")
    p.add_argument("--max-diff", type=float, default=1e-4, help="allowed train-vs-deploy max |diff|")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- training

def param_groups(model: nn.Module, wd: float, bn_wd: bool):
    decay, no_decay = [], []
    for mod in model.modules():
        for name, prm in mod.named_parameters(recurse=False):
            is_weight_of_conv_or_linear = name == "weight" and isinstance(mod, (nn.Conv2d, nn.Linear))
            (decay if (is_weight_of_conv_or_linear or bn_wd) else no_decay).append(prm)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda_factory(total_steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, bs: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])


def accuracy(logits: torch.Tensor | np.ndarray, labels) -> float:
    logits = torch.as_tensor(logits)
    return (logits.argmax(1) == torch.as_tensor(labels)).double().mean().item()


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args, model, x_train, y_train, x_test, y_test, run_dir: Path) -> dict:
    n = len(x_train)
    steps_per_epoch = n // args.batch_size  # drop last partial batch: fixed step count
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(param_groups(model, args.weight_decay, args.bn_weight_decay),
                          lr=args.lr, momentum=args.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(total_steps, args.warmup_steps))
    state = {"epoch": 0, "history": [], "train_seconds": 0.0}
    ckpt_path = run_dir / "last.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in ("arch", "seed", "epochs", "batch_size", "lr", "weight_decay", "bn_weight_decay",
                    "limit_train", "no_flip"):
            if ck["args"][key] != getattr(args, key):
                raise SystemExit(f"--resume: checkpoint has {key}={ck['args'][key]!r}, "
                                 f"command line has {getattr(args, key)!r}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = ck["state"]
        log(f"[{args.arch}] resumed from {ckpt_path} after epoch {state['epoch']}")
    elif args.resume:
        log(f"[{args.arch}] --resume given but {ckpt_path} does not exist; starting from scratch")

    tty = sys.stderr.isatty()
    for epoch in range(state["epoch"], args.epochs):
        t0 = time.time()
        model.train()
        # Deterministic data order / augmentation: depends only on (seed, epoch).
        rng = np.random.default_rng([args.seed, epoch])
        perm = torch.from_numpy(rng.permutation(n))
        flips = torch.from_numpy(rng.random(n) < 0.5) if not args.no_flip else None
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if flips is not None:
                fb = flips[idx]
                xb = torch.where(fb[:, None, None, None], xb.flip(-1), xb)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            if step % 10 == 0 or step == steps_per_epoch - 1:
                el = time.time() - t0
                msg = (f"[{args.arch}] epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                       f"loss {loss_sum / seen:.4f} {(step + 1) / max(el, 1e-9):.2f} it/s")
                if tty:
                    sys.stderr.write("\r" + msg)
                    sys.stderr.flush()
                (run_dir / "progress.txt").write_text(msg + "\n")  # for polling non-TTY runs
        if tty:
            sys.stderr.write("\r\033[K")
        test_acc = accuracy(predict(model, x_test), y_test)
        dt = time.time() - t0
        state["train_seconds"] += dt
        state["epoch"] = epoch + 1
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "test_acc": test_acc, "lr_end": sched.get_last_lr()[0], "seconds": dt}
        state["history"].append(rec)
        log(f"[{args.arch}] epoch {epoch + 1}/{args.epochs} loss {rec['train_loss']:.4f} "
            f"train_acc {rec['train_acc']:.4f} test_acc {test_acc:.4f} lr {rec['lr_end']:.4g} "
            f"time {dt:.1f}s (total {state['train_seconds'] / 60:.1f} min)")
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "state": state, "args": vars(args)}, ckpt_path)
    return state


# --------------------------------------------------------------------------- analysis

def unit_bn_vars(model: nn.Module) -> dict[str, torch.Tensor]:
    """For every re-param unit: running_var of all its BN branches, stacked [n_bn, C_out]."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "reparameterize") and m is not model:
            vs = [bn.running_var.detach().clone() for bn in m.modules() if isinstance(bn, nn.BatchNorm2d)]
            out[name] = torch.stack(vs)
    return out


def conv_weight_stats(deploy: nn.Module, bn_vars: dict[str, torch.Tensor], onnx_inits: set[str]) -> list[dict]:
    rows = []
    for name, m in deploy.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        w = m.weight.detach().double()
        per_ch = w.abs().flatten(1).max(1).values  # max |W_c| per output channel
        maxw = per_ch.max().item()
        med = per_ch.median().item()
        worst = int(per_ch.argmax().item())
        unit = name.rsplit(".reparam_conv", 1)[0]
        row = {
            "name": f"{name}.weight",
            "in_onnx": f"{name}.weight" in onnx_inits,
            "shape": list(w.shape),
            "group": m.groups,
            "max_abs_w": maxw,
            "median_channel_max_abs_w": med,
            "spread": maxw / med if med > 0 else float("inf"),
            "worst_channel": worst,
        }
        if unit in bn_vars:
            v = bn_vars[unit]
            row["worst_channel_min_bn_running_var"] = v[:, worst].min().item()
            row["channels_all_bn_var_below_1e-6"] = int((v.max(0).values < 1e-6).sum().item())
        rows.append(row)
    return rows


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def render_weight_stats_md(stats: dict) -> str:
    lines = [
        "# Weight statistics of the shipped deploy-form (re-parameterized) models",
        "",
        "Generated by `python -m models.train` (do not edit by hand). One row per merged conv.",
        "",
        "- `max|w|`: largest absolute weight in the tensor.",
        "- `spread` = max|W| / median over output channels c of max|W_c| (per-tensor outlier factor).",
        "- `worst ch`: output channel holding max|w|; `min BN var`: smallest BN running_var among the",
        "  train-form branches of that channel (merging multiplies a branch by gamma/sqrt(var+eps),",
        "  eps = 1e-5); `collapsed ch`: output channels where every branch BN has running_var < 1e-6.",
        "",
    ]
    for arch in sorted(stats):
        rows = stats[arch]["convs"]
        worst = max(rows, key=lambda r: r["max_abs_w"])
        worst_s = max(rows, key=lambda r: r["spread"])
        lines += [
            f"## {arch} (`{stats[arch]['onnx']}`)",
            "",
            f"Worst max|w| = {_fmt(worst['max_abs_w'])} (`{worst['name']}`); "
            f"worst spread = {_fmt(worst_s['spread'])} (`{worst_s['name']}`). "
            f"Convs with max|w| > 100: {sum(r['max_abs_w'] > 100 for r in rows)}; "
            f"with spread > 50: {sum(r['spread'] > 50 for r in rows)} (of {len(rows)}).",
            "",
            "| name | shape | group | max\\|w\\| | spread | worst ch | min BN var | collapsed ch |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            mv = r.get("worst_channel_min_bn_running_var")
            lines.append(
                f"| `{r['name']}` | {'x'.join(map(str, r['shape']))} | {r['group']} | "
                f"{_fmt(r['max_abs_w'])} | {_fmt(r['spread'])} | {r['worst_channel']} | "
                f"{'-' if mv is None else f'{mv:.2e}'} | {r.get('channels_all_bn_var_below_1e-6', '-')} |")
        lines.append("")
    return "\n".join(lines)


def update_json(path: Path, key: str, value) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    run_dir = Path(args.workdir) / args.arch
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    build, cfg = ARCHS[args.arch]
    model = build()
    log(f"[{args.arch}] cfg {cfg}  params(train form) {sum(p.numel() for p in model.parameters())}")

    xtr_u8, ytr = fmnist.load_split("train", args.data_dir)
    xte_u8, yte = fmnist.load_split("test", args.data_dir)
    x_train = torch.from_numpy(fmnist.preprocess(xtr_u8))
    x_test = torch.from_numpy(fmnist.preprocess(xte_u8))
    y_train, y_test = torch.from_numpy(ytr), torch.from_numpy(yte)
    if args.limit_train:
        x_train, y_train = x_train[:args.limit_train], y_train[:args.limit_train]
    log(f"[{args.arch}] data: train {tuple(x_train.shape)}  test {tuple(x_test.shape)}")

    state = train(args, model, x_train, y_train, x_test, y_test, run_dir)

    # ---- train form vs deploy form (eval mode, full test set)
    model.eval()
    train_logits = predict(model, x_test)
    train_acc = accuracy(train_logits, y_test)
    bn_vars = unit_bn_vars(model)
    deploy = copy.deepcopy(model).reparameterize()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules()), "BN left in deploy form"
    deploy_logits = predict(deploy, x_test)
    deploy_acc = accuracy(deploy_logits, y_test)
    max_diff = (train_logits - deploy_logits).abs().max().item()
    log(f"[{args.arch}] test top-1: train form {train_acc:.4f}  deploy form {deploy_acc:.4f}  "
        f"max|train-deploy| logits {max_diff:.3e}")
    torch.save(model.state_dict(), run_dir / "final_train_form.pt")
    torch.save(deploy.state_dict(), run_dir / "final_deploy_form.pt")
    if not max_diff <= args.max_diff:
        log(f"[{args.arch}] ERROR: train/deploy mismatch {max_diff:.3e} > {args.max_diff}")
        return 1

    # ---- ONNX export (deploy form)
    import onnx
    import onnxruntime as ort

    onnx_path = out_dir / f"{args.arch}_fmnist.onnx"
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    torch.onnx.export(
        deploy, torch.zeros(1, 1, 28, 28), str(onnx_path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"], do_constant_folding=True,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    om = onnx.load(str(onnx_path))
    meta = {"arch": args.arch, "dataset": "Fashion-MNIST", "input_layout": "NCHW float32 [N,1,28,28]",
            "preprocess": f"x = (pixel_uint8 / 255 - {fmnist.MEAN}) / {fmnist.STD}",
            "classes": ",".join(fmnist.CLASSES), "form": "deploy (re-parameterized)"}
    for k, v in meta.items():
        p = om.metadata_props.add()
        p.key, p.value = k, v
    om.producer_name = "onnxrep models/train.py"
    onnx.checker.check_model(om)
    onnx.save(om, str(onnx_path))
    onnx_inits = {i.name for i in om.graph.initializer}
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate([sess.run(["logits"], {"input": x_test[i:i + 1000].numpy()})[0]
                                 for i in range(0, len(x_test), 1000)])
    ort_acc = accuracy(ort_logits, y_test)
    ort_diff = float(np.abs(ort_logits - deploy_logits.numpy()).max())
    log(f"[{args.arch}] ONNX {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB): ORT top-1 {ort_acc:.4f}  "
        f"max|ORT-torch deploy| {ort_diff:.3e}")

    # ---- weight statistics
    rows = conv_weight_stats(deploy, bn_vars, onnx_inits)
    missing = [r["name"] for r in rows if not r["in_onnx"]]
    if missing:
        log(f"[{args.arch}] note: conv weights not found by name among ONNX initializers: {missing}")
    ws_json = out_dir / "WEIGHT_STATS.json"
    stats = update_json(ws_json, args.arch, {"onnx": onnx_path.name, "convs": rows})
    (out_dir / "WEIGHT_STATS.md").write_text(render_weight_stats_md(stats))
    worst = max(rows, key=lambda r: r["max_abs_w"])
    worst_s = max(rows, key=lambda r: r["spread"])
    log(f"[{args.arch}] worst max|w| {worst['max_abs_w']:.4g} ({worst['name']}); "
        f"worst spread {worst_s['spread']:.4g} ({worst_s['name']})")

    results = {
        "cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "recipe": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay",
                                                 "bn_weight_decay", "warmup_steps", "no_flip", "seed")},
        "optimizer": "SGD nesterov, per-step cosine LR with linear warmup; weight decay only on "
                     "conv/linear weights unless bn_weight_decay",
        "params_train_form": sum(p.numel() for p in model.parameters()),
        "params_deploy_form": sum(p.numel() for p in deploy.parameters()),
        "train_minutes": state["train_seconds"] / 60,
        "threads": args.threads,
        "torch": torch.__version__, "platform": platform.platform(),
        "history": state["history"],
        "test_top1_train_form": train_acc,
        "test_top1_deploy_form": deploy_acc,
        "test_top1_onnxruntime": ort_acc,
        "max_abs_diff_train_vs_deploy": max_diff,
        "max_abs_diff_onnxruntime_vs_torch_deploy": ort_diff,
        "worst_max_abs_w": worst["max_abs_w"], "worst_max_abs_w_conv": worst["name"],
        "worst_spread": worst_s["spread"], "worst_spread_conv": worst_s["name"],
        "onnx_bytes": onnx_path.stat().st_size,
    }
    update_json(out_dir / "TRAINING_RESULTS.json", args.arch, results)
    log(f"[{args.arch}] done in {(time.time() - t_start) / 60:.1f} min (training {results['train_minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
