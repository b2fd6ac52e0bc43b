"""Cost of `onnxrep quantize` next to onnxruntime alone on the same data: wall time, peak RSS,
their ratios, onnxrep's stage split and the accuracy of both.

Per model (the shipped RepVGG and MobileOne on models/fmnist_calib.npz; PP-OCRv4's detector,
fetched by tools/fetch_ppocr.py, on rendered images as in tools/bench_ppocr.py) and per mode
(per-tensor, per-channel), each run in its own subprocess, measured back to back:
- onnxruntime alone, its documented flow in a scratch directory: `quant_pre_process` (symbolic
  shape inference skipped for the detector, whose dynamic dims it cannot infer), then
  `quantize_static` QDQ, uint8 activations / int8 weights, MinMax;
- `onnxrep quantize` with its defaults (optimize passes, bias correction on) and --json, whose
  `stages` give the split (absent in versions before the split existed).
Wall time is the subprocess's (interpreter start included), peak RSS its ru_maxrss (os.wait4).
Accuracy: top-1 on models/fmnist_eval.npz; detector: probability-map SQNR (dB) vs FP32 on
rendered test images.

usage: python tools/bench_quantize.py [--onnxrep-path DIR] [--label after] [--save out.json]
                                      [--compare before.json] [--models repvgg,mobileone,det]
`--onnxrep-path` puts another checkout first on PYTHONPATH (e.g. the code before a change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

# Peak RSS is the child's own VmHWM, written at exit: ru_maxrss of a forked child starts at the
# parent's RSS on Linux (exec keeps the high-water mark), which would hide small peaks.
PEAK = r"""
import atexit, os, sys
def _hwm():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(os.environ["BENCH_HWM_FILE"], "w") as f:
        f.write(kb)
atexit.register(_hwm)
"""
ONNXREP = PEAK + r"""
import runpy
sys.argv = ["onnxrep"] + sys.argv[1:]
runpy.run_module("onnxrep", run_name="__main__", alter_sys=True)
"""
ORT_WORKER = PEAK + r"""
import numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
src, calib, out, per_channel, batch, skip_sym = sys.argv[1:7]
data = np.load(calib)
name = onnx.load(src, load_external_data=False).graph.input[0].name
x = data["input"] if "input" in data else data["x"]
batch = int(batch)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(x[i:i + batch] for i in range(0, len(x), batch))
    def get_next(self):
        v = next(self.it, None)
        return None if v is None else {name: v}
os.chdir(os.path.dirname(out))
pre = out + ".pre.onnx"
quant_pre_process(src, pre, skip_symbolic_shape=skip_sym == "1")
quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=per_channel == "1")
"""


def cpu_flags() -> str:
    model, flags = "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    isa = [f for f in flags if f.startswith(("avx", "sse4", "fma", "amx")) or "vnni" in f]
    return f"CPU: {model}, {os.cpu_count()} cores; ISA flags: {' '.join(isa)}"


def measure(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd`` in ``cwd`` (not the repository: `python -m`/`-c` put the working directory
    first on sys.path); wall seconds, peak RSS (MB) of that process, exit code, stdout."""
    start = time.perf_counter()
    hwm = cwd / "hwm.txt"
    hwm.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd,
                                env={**env, "BENCH_HWM_FILE": str(hwm)})
        proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    rss = int(hwm.read_text()) / 1024 if hwm.exists() else math.nan
    return {"seconds": wall, "rss_mb": rss, "rc": proc.returncode,
            "stdout": stdout, "error": stderr.strip().splitlines()[-1] if proc.returncode
            and stderr.strip() else None}


def det_data(tmp: Path, calib: int, test: int, size: tuple[int, int]):
    from bench_ppocr import preprocess, render

    h, w = size
    x = preprocess([render(1000 + i, (h, w)) for i in range(calib)])
    np.savez(tmp / "det_calib.npz", x=x)
    return tmp / "det_calib.npz", preprocess([render(9000 + i, (h, w)) for i in range(test)])


def accuracy(kind: str, reference: Path, qdq: Path, test) -> float | None:
    """The metric, or None when the model is missing or onnxruntime cannot run it (onnxruntime
    alone writes an invalid per-channel model for the opset-11 detector)."""
    if not qdq.exists():
        return None
    try:
        return _accuracy(kind, reference, qdq, test)
    except Exception as exc:  # the baseline's failure is a result, not a crash
        print(f"{qdq.name}: cannot evaluate: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
        return None


def _accuracy(kind: str, reference: Path, qdq: Path, test) -> float:
    if kind == "top1":
        from onnxrep.evaluation import evaluate

        return 100 * evaluate(str(qdq), str(test)).top1
    from bench_ppocr import probs, sqnr

    ref, _ = probs(str(reference), test)
    out, _ = probs(str(qdq), test)
    return sqnr(ref, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnxrep-path", type=Path, default=ROOT)
    p.add_argument("--label", default="after")
    p.add_argument("--models", default="repvgg,mobileone,det")
    p.add_argument("--det-calib", type=int, default=8, help="detector calibration images")
    p.add_argument("--det-test", type=int, default=8, help="detector test images")
    p.add_argument("--det-size", default="480x640")
    p.add_argument("--save", type=Path, help="write the results as JSON")
    p.add_argument("--compare", type=Path, help="JSON of an earlier run (e.g. before)")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(args.onnxrep_path.resolve())}
    results = []
    print(cpu_flags(), flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxrep-benchq-") as tmp:
        tmp = Path(tmp)
        cases = []
        for name in args.models.split(","):
            if name == "det":
                from fetch_ppocr import fetch

                h, w = (int(v) for v in args.det_size.split("x"))
                calib, test = det_data(tmp, args.det_calib, args.det_test, (h, w))
                cases.append(("ppocrv4_det", fetch(), calib, test, "sqnr",
                              ["--batch-size", "1", "--input-shape", f"x:1x3x{h}x{w}"], 1, "1"))
            else:
                cases.append((f"{name}_fmnist", ROOT / "models" / f"{name}_fmnist.onnx",
                              ROOT / "models" / "fmnist_calib.npz",
                              ROOT / "models" / "fmnist_eval.npz", "top1", [], 32, "0"))
        for name, src, calib, test, kind, extra, batch, skip_sym in cases:
            for per_channel in (False, True):
                mode = "per-channel" if per_channel else "per-tensor"
                ort_out = tmp / f"{name}.{mode}.ort.onnx"
                ort = measure([sys.executable, "-c", ORT_WORKER, str(src), str(calib),
                               str(ort_out), str(int(per_channel)), str(batch), skip_sym], env, tmp)
                rep_out = tmp / f"{name}.{mode}.onnxrep.onnx"
                rep = measure([sys.executable, "-c", ONNXREP, "quantize", str(src), "--calib",
                               str(calib), "-o", str(rep_out), "--force", "--json", "-q", *extra,
                               *(["--per-channel"] if per_channel else [])], env, tmp)
                stages = None
                if rep["rc"] == 0:
                    doc = json.loads(rep["stdout"])
                    stages = doc.get("stages")
                row = {"model": name, "mode": mode, "label": args.label,
                       "ort_s": ort["seconds"], "ort_mb": ort["rss_mb"], "ort_error": ort["error"],
                       "rep_s": rep["seconds"], "rep_mb": rep["rss_mb"], "rep_error": rep["error"],
                       "stages": stages, "metric": kind,
                       "ort_acc": accuracy(kind, src, ort_out, test),
                       "rep_acc": accuracy(kind, src, rep_out, test)}
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))
    rows = results
    if args.compare:
        rows = json.loads(args.compare.read_text()) + results
    print()
    print(cpu_flags())
    print("metric: top-1 % on fmnist_eval.npz (fmnist), prob-map SQNR dB vs FP32 (ppocrv4_det)")
    print("| model | mode | code | ort s | onnxrep s | time ratio | ort MB | onnxrep MB | RSS ratio "
          "| ort metric | onnxrep metric | stages (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["mode"], r["label"] != "before")):
        stages = ", ".join(f"{k} {v:.1f}" for k, v in (r["stages"] or {}).items()) or "-"
        print(f"| {r['model']} | {r['mode']} | {r['label']} | {r['ort_s']:.1f} | {r['rep_s']:.1f} "
              f"| {r['rep_s'] / r['ort_s']:.2f} | {r['ort_mb']:.0f} | {r['rep_mb']:.0f} "
              f"| {r['rep_mb'] / r['ort_mb']:.2f} | {_v(r['ort_acc'])} | {_v(r['rep_acc'])} "
              f"| {stages} |")
        for who in ("ort", "rep"):
            if r[f"{who}_error"]:
                print(f"  {who} failed: {r[f'{who}_error']}")
    return 0


def _v(x) -> str:
    return "failed" if x is None else ("inf" if not math.isfinite(x) else f"{x:.2f}")


if __name__ == "__main__":
    sys.exit(main())
