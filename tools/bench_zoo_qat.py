"""QAT on the model zoo: FP32, PTQ per-tensor and a short distilled QAT with and without restored BN.

For each zoo model (tools/fetch_zoo.py) with its rendered calibration and test sets and a
training set rendered from seeds of its own (tools/zoo/models.py: train_set), runs, each in its
own subprocess in a scratch directory, timed (wall, CPU) with its peak RSS (bench_zoo.measure):
  PTQ per-tensor: python -m onnxrep quantize MODEL --calib calib.npz (defaults)
  QAT, restored BN / without: python -m onnxrep qat MODEL --data train.npz --calib calib.npz
      --restore-bn | --no-restore-bn, the same seed, data order, steps and settings otherwise;
then scores every result with the model's task metric on the test set (bench_zoo's cells) and
prints one markdown table, or --json. QAT has no labels here: it distils from the FP32 model
(onnxrep.training.distill picks the loss per output: KL for the classifiers' and the
recognizer's Softmax outputs, normalized MSE for the detectors' maps and the layout head).

Per-model settings (SETTINGS): batch size and training-set size so one epoch is a short run on
2 cores; the layout model's input has a fixed batch of 1. --max-minutes bounds each run's
training loop (default 15, the issue's bound).

--runs picks a subset of the three; --qat-args passes further flags to both QAT runs (the
recipe's ablations: "--optimizer sgd", "--no-from-ptq", "--range-averaging 0.01",
"--no-keep-better").

usage: python tools/bench_zoo_qat.py [--models a,b] [--runs ptq,qat_bn,qat_nobn]
           [--calib 64] [--test 64] [--lr LR] [--freeze-bn-after K] [--qat-args="..."]
           [--max-minutes 15] [--threads 2] [--json] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench_zoo import (add_output_options, cell, fmt_metric, header, measure,  # noqa: E402
                       run_models)
from fetch_zoo import DEFAULT_CACHE, MODELS  # noqa: E402
from zoo.models import SPECS, harness, train_set  # noqa: E402

RUNS = ("ptq", "qat_bn", "qat_nobn")
SETTING_KEYS = ("lr", "freeze_bn_after", "qat_args", "seed", "max_minutes", "threads", "calib",
                "test")
TITLES = {"ptq": "PTQ per-tensor (`onnxrep quantize`)", "qat_bn": "QAT, restored BN",
          "qat_nobn": "QAT, no BN restored"}


@dataclass(frozen=True)
class Settings:
    batch: int   # training batch
    train: int   # training samples: one epoch


SETTINGS = {
    "ppocrv4_det": Settings(batch=2, train=32),
    "ppocrv6_det": Settings(batch=2, train=32),
    "ppocrv6_rec": Settings(batch=8, train=256),
    "cls": Settings(batch=16, train=512),
    "orientation": Settings(batch=8, train=256),
    "layout": Settings(batch=1, train=16),  # the model's input batch is fixed at 1
}


def log(msg: str) -> None:
    print(f"[bench_zoo_qat {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def command(run: str, model: Path, calib: Path, train: Path, out: Path, s: Settings,
            args) -> list[str]:
    if run == "ptq":
        return [sys.executable, "-m", "onnxrep", "quantize", str(model), "--calib", str(calib),
                "-o", str(out), "--force"]
    return [sys.executable, "-m", "onnxrep", "qat", str(model), "--data", str(train),
            "--calib", str(calib), "--restore-bn" if run == "qat_bn" else "--no-restore-bn",
            "--batch-size", str(s.batch), "--seed", str(args.seed),
            *(["--lr", str(args.lr)] if args.lr is not None else []),
            "--max-minutes", str(args.max_minutes), "--threads", str(args.threads),
            "--rtol", "1e-4", "-o", str(out), "--force", "--json",
            *(["--freeze-bn-after", str(args.freeze_bn_after)]
              if args.freeze_bn_after is not None else []), *shlex.split(args.qat_args)]


def bench_model(name: str, args) -> dict:
    spec, s = SPECS[name], SETTINGS[name]
    h = harness(name, args.calib, args.test, args.cache_dir, log)
    train = train_set(name, s.train, args.cache_dir, log)
    row = {"model": name, "what": spec.what, "task": spec.task, "batch": s.batch,
           "train": s.train, "fp32": h.metric(h.model), "runs": {}}
    log(f"{name}: FP32 {row['fp32']}")
    for run in args.runs:
        with tempfile.TemporaryDirectory(prefix=f"zooqat-{name}-{run}-") as tmp:
            out = Path(tmp) / f"{name}.{run}.onnx"
            cmd = command(run, h.model, h.calib, train, out, s, args)
            log(f"{name}: {run}: {' '.join(shlex.quote(c) for c in cmd)}")
            result = measure(cmd, Path(tmp), args.timeout)
            if result["error"] is None:
                result["metric"] = h.metric(out)
                if run != "ptq":  # measure() keeps only the tail of stdout
                    doc = json.loads((Path(tmp) / "child.stdout").read_text())
                    result["qat"] = _qat_summary(doc)
            result.pop("stdout")
            log(f"{name}: {run}: rc {result['rc']}, {result['wall_s']:.0f} s, "
                f"{result.get('metric') or result['error']}")
            row["runs"][run] = result
    return row


def _qat_summary(doc: dict) -> dict:
    """Steps, losses (first step, mean of the last five) and times from `qat --json`."""
    losses = [h["loss"] for h in doc["history"]]
    tail = losses[-5:]
    return {"steps": doc["steps"], "samples": doc["samples"],
            "train_s": doc["train_seconds"], "restored_bn": doc["restored_bn"],
            "loss_first": losses[0] if losses else None,
            "loss_last5": sum(tail) / len(tail) if tail else None,
            "choice": doc.get("choice"),
            "deployment_sqnr": min((o["sqnr_db"] for o in doc["deployment"].values()
                                    if o.get("sqnr_db") is not None),
                                   default=None)}


def qat_cell(task: str, run: dict) -> str:
    text = cell(task, run)
    q = run.get("qat")
    if not q:
        return text
    c = q.get("choice")
    kept = ("" if not c else f"; {'QAT' if c['kept'] == 'qat' else 'PTQ'} kept ({c['qat_db']:.1f} "
            f"vs {c['ptq_db']:.1f} dB on calibration)")
    return (f"{text}; {q['steps']} steps in {q['train_s']:.0f} s, loss "
            f"{q['loss_first']:.3g} -> {q['loss_last5']:.3g}{kept}")


def table(rows: list[dict]) -> str:
    lines = ["| model | FP32 | " + " | ".join(TITLES[r] for r in RUNS) + " |",
             "|" + "---|" * (2 + len(RUNS))]
    for r in rows:
        cells = [qat_cell(r["task"], r["runs"][k]) if k in r["runs"] else "not run"
                 for k in RUNS]
        lines.append(f"| {r['model']}: {r['what']} (QAT batch {r['batch']}, {r['train']} "
                     f"training samples) | {fmt_metric(r['task'], r['fp32'], True)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    p.add_argument("--calib", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--test", type=int, default=64, help="test samples (default 64)")
    p.add_argument("--lr", type=float, help="QAT peak learning rate (default: onnxrep qat's)")
    p.add_argument("--freeze-bn-after", type=int, metavar="K",
                   help="passed to onnxrep qat (default: not passed)")
    p.add_argument("--qat-args", default="",
                   help='further onnxrep qat flags for both QAT runs: --qat-args="--flag ..." '
                        "(a value starting with -- needs the =)")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"comma-separated subset of {','.join(RUNS)} (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=15,
                   help="bound on each QAT run's training loop (default 15)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per QAT run")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    add_output_options(p, "rows in zoo order; runs made with other settings are refused")
    args = p.parse_args(argv)
    args.runs = [r for r in args.runs.split(",") if r]
    if not args.runs or set(args.runs) - set(RUNS):
        p.error(f"--runs takes a comma-separated subset of {','.join(RUNS)}")
    if args.from_json:
        docs = [json.loads(f.read_text()) for f in args.from_json]
        settings = {json.dumps({k: d["header"].get(k) for k in SETTING_KEYS}) for d in docs}
        if len(settings) > 1:
            p.error(f"the files were run with different settings: {sorted(settings)}")
        rows = {r["model"]: r for d in docs for r in d["rows"]}
        report(docs[0]["header"], [rows[n] for n in MODELS if n in rows])
        return 0
    info = {**header(argparse.Namespace(calib=args.calib, test=args.test, onnxrep_args="")),
            "lr": args.lr, "freeze_bn_after": args.freeze_bn_after,
            "qat_args": args.qat_args, "seed": args.seed,
            "max_minutes": args.max_minutes, "threads": args.threads}
    return run_models(p, args, info, bench_model, report)


def report(info: dict, rows: list[dict]) -> None:
    print(f"CPU: {info['cpu']}")
    print(f"onnxruntime {info['onnxruntime']}, onnx {info['onnx']}, commit {info['commit']}; "
          f"{info['calib']} calibration / {info['test']} test samples; QAT: lr "
          f"{'onnxrep qat default' if info['lr'] is None else format(info['lr'], 'g')}, "
          f"seed {info['seed']}, {info['threads']} torch threads, at most "
          f"{info['max_minutes']:g} min of training"
          + (f", BN frozen after {info['freeze_bn_after']} steps"
             if info["freeze_bn_after"] is not None else "")
          + (f", onnxrep qat {info['qat_args']}" if info.get("qat_args") else ""))
    print("Each cell: task metric, SQNR vs FP32; wall time (CPU time) and peak RSS of that "
          "subprocess (QAT: all of it, passes and export included); QAT: steps, training "
          "time, distillation loss at the first step -> mean of the last five.\n")
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
