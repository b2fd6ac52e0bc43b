"""The model zoo benchmark: real pretrained OCR/document models, onnxrep vs onnxruntime alone.

For each zoo model (tools/fetch_zoo.py) and its rendered calibration and test sets
(tools/zoo/models.py), quantizes to INT8 QDQ four ways, each in its own subprocess in a scratch
temporary directory, timing it and taking its peak RSS (the VmHWM of that child):
  onnxruntime alone, per-tensor and per-channel: tools/zoo/ort_quantize.py (quant_pre_process,
      opset 13 first for per-channel, quantize_static QDQ, QUInt8/QInt8, MinMax);
  onnxrep, per-tensor and per-channel: python -m onnxrep quantize MODEL --calib calib.npz
      [--per-channel] -o OUT --force
then scores every result with the model's task metric on the test set and prints one markdown
table (a cell: metric, quantize wall time, peak RSS; or the exit code and the one-line error).
Metrics: rec = char accuracy (1 - edit distance / ground-truth length, CTC greedy);
det = hmean of DB boxes (threshold 0.3, box score 0.5, unclip 1.6, IoU >= 0.5 vs the rendered
line boxes) and probability-map SQNR vs FP32; cls/orientation = top-1 vs the rendered label;
layout = SQNR of all outputs vs FP32 and F1 of decoded boxes vs FP32's boxes.

usage: python tools/bench_zoo.py [--models a,b] [--calib 64] [--test 64] [--json]
                                 [--cache-dir DIR] [--keep DIR] [--timeout S] [--save FILE]
       python tools/bench_zoo.py --from-json FILE...     (the table of earlier runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from fetch_zoo import DEFAULT_CACHE, MODELS  # noqa: E402
from zoo.models import SPECS, harness  # noqa: E402

CONFIGS = [("ort", False), ("ort", True), ("onnxrep", False), ("onnxrep", True)]
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
       "amx_bf16")


def log(msg: str) -> None:
    print(f"[bench_zoo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    flags = set()
    name = "unknown"
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and name == "unknown":
            name = line.split(":", 1)[1].strip()
    have = " ".join(f for f in ISA if f in flags) or "none of " + ",".join(ISA)
    return f"{name}, {os.cpu_count()} logical CPUs; ISA flags: {have}"


def measure(cmd: list[str], cwd: Path, timeout: float) -> dict:
    """Run one child; its wall time, CPU time (os.wait4), peak RSS, exit code, and the last
    line of its stderr. Peak RSS is the child's VmHWM, read every 50 ms while it runs: its
    ru_maxrss would start from this (large) process's RSS at fork, which Linux carries over the
    exec, and so floor every small child at the parent's size."""
    out_path, err_path = cwd / "child.stdout", cwd / "child.stderr"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(TOOLS.parent), env.get("PYTHONPATH")] if p)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=env)
        timed_out, peak_kb = False, 0
        while True:
            peak_kb = max(peak_kb, hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout and not timed_out:
                proc.kill()
                timed_out = True
            time.sleep(0.05)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace").strip().splitlines()
    error = None
    if timed_out:
        error = f"timeout after {timeout:.0f} s"
    elif proc.returncode != 0:
        lines = [ln for ln in stderr if ln.strip()]
        error = lines[-1].strip() if lines else ""
    return {"rc": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": peak_kb / 1024,
            "error": error, "stdout": out_path.read_text(errors="replace").strip()[-2000:]}


def hwm_kb(pid: int) -> int:
    """The peak RSS (VmHWM, kB) of a running process; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) if line else 0


def command(tool: str, per_channel: bool, model: Path, calib: Path, out: Path,
            extra: list[str]) -> list[str]:
    if tool == "ort":
        return [sys.executable, str(TOOLS / "zoo" / "ort_quantize.py"), str(model), str(calib),
                str(out), *(["--per-channel"] if per_channel else [])]
    return [sys.executable, "-m", "onnxrep", "quantize", str(model), "--calib", str(calib),
            *(["--per-channel"] if per_channel else []), "-o", str(out), "--force", *extra]


def bench_model(name: str, args) -> dict:
    spec = SPECS[name]
    h = harness(name, args.calib, args.test, args.cache_dir, log)
    log(f"{name}: FP32 on {args.test} test samples")
    row = {"model": name, "what": spec.what, "task": spec.task, "primary": spec.primary,
           "file": h.model.name, "fp32": h.metric(h.model), "runs": {}}
    log(f"{name}: FP32 {row['fp32']}")
    extra = shlex.split(args.onnxrep_args)
    for tool, per_channel in CONFIGS:
        key = f"{tool}_{'pc' if per_channel else 'pt'}"
        if key not in args.configs.split(","):
            continue
        with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-{key}-") as tmp:
            tmp = Path(tmp)
            out = tmp / f"{name}.{key}.int8.onnx"
            cmd = command(tool, per_channel, h.model, h.calib, out, extra)
            log(f"{name}: {key}: {' '.join(shlex.quote(c) for c in cmd)}")
            run = measure(cmd, tmp, args.timeout)
            if run["rc"] == 0 and not out.exists():
                run["error"] = "exit 0 but no output file"
            if run["error"] is None:
                try:
                    run["metric"] = h.metric(out)
                except Exception as exc:  # a model that quantizes but does not run
                    run["error"] = f"scoring failed: {type(exc).__name__}: " \
                                   f"{str(exc).strip().splitlines()[0][:160]}"
                if args.keep:
                    keep = Path(args.keep)
                    keep.mkdir(parents=True, exist_ok=True)
                    os.replace(out, keep / out.name)
            if tool == "ort" and run["rc"] == 0:
                try:
                    run["ort_log"] = json.loads(run["stdout"].splitlines()[-1])
                except (ValueError, IndexError):
                    pass
            if tool == "onnxrep" and run["rc"] == 0:
                run["stages"] = stages(run["stdout"])
            run.pop("stdout")
            log(f"{name}: {key}: rc {run['rc']}, {run['wall_s']:.1f} s, "
                f"{run['peak_rss_mb']:.0f} MB, {run.get('metric') or run['error']}")
            row["runs"][key] = run
    return row


def stages(stdout: str) -> dict[str, float]:
    """The seconds per stage of onnxrep quantize's `stages:` line."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("stages: ")), "")
    found = re.findall(r"([a-z_ -]+?) ([0-9.]+) s(?:,|$)", line[len("stages: "):])
    return {name.strip(): float(sec) for name, sec in found}


def stage_table(rows: list[dict]) -> str:
    """Seconds per stage of each onnxrep run, beside onnxruntime alone's whole run."""
    names = list(dict.fromkeys(k for r in rows for key in ("onnxrep_pt", "onnxrep_pc")
                               for k in r["runs"].get(key, {}).get("stages", {})))
    lines = ["| model, mode | onnxruntime alone | onnxrep | " + " | ".join(names) + " |",
             "|" + "---|" * (3 + len(names))]
    for r in rows:
        for mode in ("pt", "pc"):
            mine, ort = r["runs"].get(f"onnxrep_{mode}"), r["runs"].get(f"ort_{mode}")
            if not mine or not mine.get("stages"):
                continue
            cells = [f"{mine['stages'][n]:.1f}" if n in mine["stages"] else "" for n in names]
            alone = f"{ort['wall_s']:.1f}" if ort else ""
            lines.append(f"| {r['model']} {mode} | {alone} | {mine['wall_s']:.1f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_metric(task: str, m: dict, fp32: bool = False) -> str:
    """The headline metric; quantized cells add the SQNR vs FP32 (FP32's own is infinite)."""
    if task == "layout":
        if fp32:
            return f"F1 {m['f1_vs_gt']:.3f} vs rendered blocks"
        return f"{_db(m['sqnr'])}, F1 {m['f1_vs_fp32']:.3f} vs FP32 boxes"
    main = {"det": f"hmean {m.get('hmean', 0):.3f}",
            "rec": f"char {m.get('char_acc', 0):.4f}"}.get(task, f"top-1 {m.get('top1', 0):.3f}")
    if fp32:
        return main
    key = {"det": "hmean_vs_fp32", "rec": "char_vs_fp32"}.get(task, "top1_vs_fp32")
    agree = f" ({m[key]:.3f} vs FP32's own)" if m.get(key) is not None else ""
    return f"{main}{agree}, {_db(m['sqnr'])}"


def _db(v) -> str:
    return "inf dB" if v is None else f"{v:.1f} dB"


def cell(task: str, run: dict) -> str:
    cpu = f" ({run['cpu_s']:.0f} s CPU)" if run.get("cpu_s") else ""
    cost = f"{run['wall_s']:.0f} s{cpu}, {run['peak_rss_mb'] / 1024:.2f} GB"
    if run.get("error") is not None:
        err = run["error"].replace("|", "\\|")[:160]
        return f"**failed** (exit {run['rc']}: {err}); {cost}"
    return f"{fmt_metric(task, run['metric'])}; {cost}"


def ratio(row: dict, mode: str) -> str:
    a, b = row["runs"].get(f"onnxrep_{mode}"), row["runs"].get(f"ort_{mode}")
    if not a or not b:
        return ""
    note = "" if a.get("error") is None and b.get("error") is None else " (a run failed)"
    return (f"{a['wall_s'] / b['wall_s']:.1f}x time, "
            f"{a['peak_rss_mb'] / b['peak_rss_mb']:.1f}x mem{note}")


def table(rows: list[dict]) -> str:
    head = ("| model | FP32 | onnxruntime alone, per-tensor | onnxruntime alone, per-channel | "
            "onnxrep, per-tensor | onnxrep, per-channel | onnxrep / onnxruntime, per-tensor | "
            "onnxrep / onnxruntime, per-channel |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        runs = r["runs"]
        cells = [cell(r["task"], runs[k]) if (k := f"{t}_{'pc' if pc else 'pt'}") in runs
                 else "not run" for t, pc in CONFIGS]
        lines.append(f"| {r['model']}: {r['what']} | {fmt_metric(r['task'], r['fp32'], True)} | "
                     + " | ".join(cells) + f" | {ratio(r, 'pt')} | {ratio(r, 'pc')} |")
    return "\n".join(lines)


def header(args) -> dict:
    import onnx
    import onnxruntime

    try:
        commit = subprocess.run(["git", "-C", str(TOOLS), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu_flags(), "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "python": platform.python_version(), "commit": commit,
            "calib": args.calib, "test": args.test, "onnxrep_args": args.onnxrep_args}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    p.add_argument("--calib", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--test", type=int, default=64, help="test samples (default 64)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="models and rendered data (default $ONNXREP_CACHE or ~/.cache/onnxrep)")
    p.add_argument("--keep", metavar="DIR", help="keep the quantized models in DIR")
    p.add_argument("--timeout", type=float, default=3600,
                   help="seconds per quantize run before it is killed (default 3600)")
    p.add_argument("--onnxrep-args", default="",
                   help="extra arguments for onnxrep quantize, e.g. '--analysis-samples 16'")
    p.add_argument("--configs", default="ort_pt,ort_pc,onnxrep_pt,onnxrep_pc",
                   help="quantize runs to do (default all four; merge partial runs with "
                        "--from-json)")
    add_output_options(p, "several files: rows in zoo order, a later file's runs of a model win")
    args = p.parse_args(argv)
    if args.from_json:
        docs = [json.loads(f.read_text()) for f in args.from_json]
        rows: dict = {}
        for r in (r for d in docs for r in d["rows"]):
            rows[r["model"]] = {**r, "runs": {**rows.get(r["model"], {}).get("runs", {}),
                                              **r["runs"]}}
        info = dict(docs[0]["header"])
        for key in ("commit", "calib", "test", "onnxrep_args"):
            values = sorted({str(d["header"][key]) for d in docs})
            info[key] = values[0] if len(values) == 1 else "/".join(values)
        report(info, [rows[n] for n in MODELS if n in rows])
        return 0
    return run_models(p, args, header(args), bench_model, report)


def add_output_options(p: argparse.ArgumentParser, merging: str) -> None:
    """--json, --save and --from-json, as :func:`run_models` and the benches' --from-json
    branch read them; ``merging``: how several --from-json files combine."""
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument("--save", type=Path, metavar="FILE",
                   help="also write the JSON document to FILE after every model")
    p.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                   help=f"print the table of earlier --json/--save runs instead of running "
                        f"({merging})")


def run_models(p: argparse.ArgumentParser, args, info: dict, bench, report) -> int:
    """``bench(name, args)`` for each model of ``args.models`` in order, the JSON document
    rewritten to ``args.save`` after each one (a killed run keeps the rows it finished); then
    the document on stdout with ``args.json``, else ``report(info, rows)``."""
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    log(info["cpu"])
    rows = []
    for name in names:
        rows.append(bench(name, args))
        if args.save:
            part = args.save.with_name(args.save.name + ".part")
            part.write_text(json.dumps({"header": info, "rows": rows}, indent=1))
            part.replace(args.save)
    if args.json:
        print(json.dumps({"header": info, "rows": rows}, indent=1))
    else:
        report(info, rows)
    return 0


def report(info: dict, rows: list[dict]) -> None:
    print(f"CPU: {info['cpu']}")
    print(f"onnxruntime {info['onnxruntime']}, onnx {info['onnx']}, Python {info['python']}, "
          f"commit {info['commit']}; {info['calib']} calibration / {info['test']} test samples"
          + (f"; onnxrep quantize {info['onnxrep_args']}" if info["onnxrep_args"] else ""))
    print("Each quantize cell: task metric; wall time (CPU time) and peak RSS of that quantize "
          "subprocess. Ratios are of wall time and peak RSS.\n")
    print(table(rows))
    if any(run.get("stages") for r in rows for run in r["runs"].values()):
        print("\nonnxrep quantize, seconds per stage (its `stages:` line; wall seconds of the "
              "whole runs for scale):\n")
        print(stage_table(rows))
    if any(run.get("ort_log", {}).get("notes") for r in rows for run in r["runs"].values()):
        print("\nonnxruntime alone notes:")
        for r in rows:
            for key, run in r["runs"].items():
                for n in run.get("ort_log", {}).get("notes", []):
                    print(f"- {r['model']} {key}: {n}")


if __name__ == "__main__":
    sys.exit(main())
