"""The zoo ablation: what each accuracy stage of `onnxrep quantize` buys on real models.

For each zoo model (tools/fetch_zoo.py, data rendered by tools/zoo/models.py) runs
`python -m onnxrep quantize` four times, each in its own subprocess (bench_zoo.measure: wall
time, CPU time, peak RSS), every row adding one stage to the one before:

  defaults            (MinMax ranges, bias correction on)
  + range search      --method auto
  + mixed precision   --method auto --min-sqnr DB   (int16 QDQ, then FP32, per sensitive node)
  + learned rounding  --method auto --min-sqnr DB --rounding learned

and scores each result with the model's task metric on the test set (bench_zoo.fmt_metric).
A cell: metric; how many nodes went to int16 / FP32 (mixed precision rows) or how many tensors
took a clipped range (range-search rows); quantize wall time.

usage: python tools/bench_ablation.py [--models a,b] [--calib 64] [--test 64] [--per-channel]
                                      [--min-sqnr 30] [--timeout S] [--save FILE]
       python tools/bench_ablation.py --from-json FILE...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench_zoo import DEFAULT_CACHE, cpu_flags, fmt_metric, measure  # noqa: E402
from fetch_zoo import MODELS  # noqa: E402
from zoo.models import SPECS, harness  # noqa: E402


def stages(min_sqnr: float) -> list[tuple[str, list[str]]]:
    auto = ["--method", "auto"]
    mixed = [*auto, "--min-sqnr", f"{min_sqnr:g}"]
    return [("defaults", []), ("+ range search", auto), ("+ mixed precision", mixed),
            ("+ learned rounding", [*mixed, "--rounding", "learned"])]


def log(msg: str) -> None:
    print(f"[bench_ablation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_model(name: str, args) -> dict:
    spec = SPECS[name]
    h = harness(name, args.calib, args.test, args.cache_dir, log)
    row = {"model": name, "what": spec.what, "task": spec.task, "fp32": h.metric(h.model),
           "runs": {}}
    for label, extra in stages(args.min_sqnr):
        with tempfile.TemporaryDirectory(prefix=f"ablation-{name}-") as tmp:
            tmp = Path(tmp)
            out = tmp / f"{name}.int8.onnx"
            cmd = [sys.executable, "-m", "onnxrep", "quantize", str(h.model), "--calib",
                   str(h.calib), *(["--per-channel"] if args.per_channel else []), "-o",
                   str(out), "--force", "--json", *extra]
            log(f"{name}: {label}: {' '.join(cmd[3:])}")
            run = measure(cmd, tmp, args.timeout)
            if run["error"] is None:  # measure keeps the child's whole stdout in its cwd
                run["metric"] = h.metric(out)
                run["detail"] = _detail(json.loads((tmp / "child.stdout").read_text()))
            run.pop("stdout")
            log(f"{name}: {label}: {run['wall_s']:.0f} s, {run.get('metric') or run['error']}")
            row["runs"][label] = run
    return row


def _detail(result: dict) -> dict:
    """From quantize's --json: range choices, nodes in int16/FP32, stage seconds."""
    ranges = result.get("ranges") or {}
    mixed = result.get("mixed_precision") or {}
    rounding = result.get("rounding") or {}
    return {"range_counts": ranges.get("counts"),
            "int16": len(mixed.get("int16", [])), "fp32": len(mixed.get("fp32", [])),
            "mixed_met": mixed.get("met"), "mixed_final": mixed.get("final"),
            "rounding_kept": rounding.get("kept"), "stages": result.get("stages")}


def cell(task: str, run: dict) -> str:
    if run.get("error") is not None:
        return f"**failed** (exit {run['rc']}: {run['error'][:120]})"
    d = run.get("detail") or {}
    notes = []
    if d.get("range_counts"):
        clipped = sum(n for k, n in d["range_counts"].items() if k != "minmax")
        notes.append(f"{clipped} clipped ranges")
    if d.get("mixed_met") is not None:
        notes.append(f"{d['int16']} int16 / {d['fp32']} FP32"
                     + ("" if d["mixed_met"] else ", target not met"))
    if d.get("rounding_kept") is not None:
        notes.append("learned kept" if d["rounding_kept"] else "nearest kept")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"{fmt_metric(task, run['metric'])}{extra}; {run['wall_s']:.0f} s"


def table(rows: list[dict], min_sqnr: float) -> str:
    labels = [label for label, _ in stages(min_sqnr)]
    lines = ["| model | FP32 | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = [cell(row["task"], row["runs"][k]) if k in row["runs"] else "-" for k in labels]
        lines.append(f"| {row['model']} | {fmt_metric(row['task'], row['fp32'], fp32=True)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--min-sqnr", type=float, default=30.0,
                   help="the mixed-precision rows' target in dB (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--save", type=Path, metavar="FILE", help="append each model's row (JSON)")
    p.add_argument("--from-json", type=Path, nargs="+", metavar="FILE")
    args = p.parse_args(argv)
    if args.from_json:
        rows = [json.loads(line) for f in args.from_json for line in f.read_text().splitlines()
                if line.strip()]
    else:
        rows = []
        for name in args.models.split(","):
            rows.append(bench_model(name, args))
            if args.save:
                with open(args.save, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    print(f"CPU: {cpu_flags()}; {'per-channel' if args.per_channel else 'per-tensor'}, "
          f"--min-sqnr {args.min_sqnr:g}\n")
    print(table(rows, args.min_sqnr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
