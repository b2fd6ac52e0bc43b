"""Nearest vs learned rounding (AdaRound, BRECQ): task metric and quantize time, per model and
granularity.

For each model, per-tensor and per-channel, quantizes back to back in this process with
onnxrep's defaults (MinMax, bias correction): ``rounding="nearest"``, then each learned mode of
``--roundings`` ("learned": AdaRound layer by layer; "block": BRECQ's two-layer blocks), and
scores each with the model's task metric:
  shipped models (models/repvgg_fmnist.onnx, models/mobileone_fmnist.onnx): top-1 on
      models/fmnist_eval.npz, calibrated on models/fmnist_calib.npz;
  zoo models (tools/zoo/models.harness): the harness's headline metric on its rendered test set
      (char_acc, hmean, top1, or sqnr for layout), calibrated on its rendered calibration set.
The table shows, per learned mode, the metric of FP32, nearest and the mode, the zoo models'
output SQNR vs FP32 on the test set, whether the learned model was kept (its held-out output
SQNR vs nearest's), the layers (block mode: and two-layer blocks) that kept learned codes, the
quantize wall time (seconds, absolute: the 10-minute bound is on it) and the ratio to nearest's
(runs back to back on the same machine), the learned run's process CPU seconds, and the
1-minute load average when the row finished (the CPU line says which machine; a load above its
CPU count means another job shared the cores).

usage: python tools/bench_rounding.py [--models repvgg,mobileone,ppocrv6_rec,...]
           [--granularity per-tensor,per-channel] [--roundings learned,block] [--calib 64]
           [--test 64] [--save FILE]
       python tools/bench_rounding.py --from-json FILE
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(ROOT))

SHIPPED = ("repvgg", "mobileone")
DEFAULT = ("repvgg", "mobileone", "ppocrv6_rec", "cls", "orientation", "ppocrv4_det",
           "ppocrv6_det", "layout")


def _scorer(name: str, calib: int, test: int):
    """(model path, calibration data, metric name, path -> (value, output SQNR vs FP32 in dB
    or None))."""
    if name in SHIPPED:
        from onnxrep.evaluation import evaluate

        ev = ROOT / "models" / "fmnist_eval.npz"
        return (ROOT / "models" / f"{name}_fmnist.onnx", ROOT / "models" / "fmnist_calib.npz",
                "top1", lambda path: (100 * evaluate(str(path), str(ev)).top1, None))
    from zoo.models import SPECS, harness

    h = harness(name, calib=calib, test=test)
    key = SPECS[name].primary
    scale = 1 if key == "sqnr" else 100

    def score(path):  # the FP32 model's SQNR against itself is None (layout's metric)
        m = h.metric(str(path))
        return (None if m[key] is None else scale * m[key]), m["sqnr"]
    return h.model, h.calib, key, score


def bench(name: str, granularity: str, calib: int, test: int,
          roundings: tuple[str, ...] = ("learned",)) -> dict:
    import onnx

    from onnxrep.progress import quiet
    from onnxrep.ptq.quantizer import QuantizeConfig, quantize_with_details

    model_path, calib_path, metric, score = _scorer(name, calib, test)
    model = onnx.load(str(model_path))
    row = {"model": name, "granularity": granularity, "metric": metric,
           "fp32": score(model_path)[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for rounding in ("nearest", *roundings):
            config = QuantizeConfig(per_channel=granularity == "per-channel", rounding=rounding)
            wall, cpu = time.monotonic(), time.process_time()
            with quiet():
                q = quantize_with_details(model, str(calib_path), config)
            row[f"{rounding}_s"] = time.monotonic() - wall
            row[f"{rounding}_cpu_s"] = time.process_time() - cpu
            out = Path(tmp) / f"{rounding}.onnx"
            onnx.save(q.model, str(out))
            row[rounding], row[f"{rounding}_sqnr"] = score(out)
            if q.rounding is not None:
                r = q.rounding
                pre = "" if rounding == "learned" else f"{rounding}_"
                row.update({f"{pre}{k}": v for k, v in dict(
                    kept=r.kept, sqnr_nearest=r.sqnr_nearest, sqnr_learned=r.sqnr_learned,
                    layers=len(r.layers), improved=sum(x.kept for x in r.layers),
                    blocks=sum(x.method == "block" for x in r.layers) // 2,
                    rounding_s=r.seconds, samples=r.samples, held_out=r.held_out).items()})
    row["load"] = os.getloadavg()[0]
    return row


def markdown(rows: list[dict], cpu: str) -> str:
    """One line per model, granularity and learned mode present in the row."""
    lines = [f"CPU: {cpu}", "",
             "| model | weights | mode | metric | FP32 | nearest | learned | learned - nearest | "
             "test SQNR nearest -> learned, dB | kept (held-out SQNR nearest -> learned, dB) | "
             "layers kept (blocks) | quantize s nearest / learned | time ratio | learned CPU s "
             "| load |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['granularity']} | | error: {r['error']} |"
                         " | | | | | | | | | | |")
            continue
        for mode in ("learned", "block"):
            if mode not in r:
                continue
            pre = "" if mode == "learned" else f"{mode}_"
            kept = (f"{'learned' if r[pre + 'kept'] else 'nearest'} "
                    f"({r[pre + 'sqnr_nearest']:.2f} -> {r[pre + 'sqnr_learned']:.2f})"
                    if r.get(pre + "sqnr_nearest") is not None else "-")
            sqnr = (f"{r['nearest_sqnr']:.2f} -> {r[mode + '_sqnr']:.2f}"
                    if r.get("nearest_sqnr") is not None and r.get(mode + "_sqnr") is not None
                    else "-")
            load = f"{r['load']:.1f}" if "load" in r else "-"
            fp32 = f"{r['fp32']:.2f}" if r.get("fp32") is not None else "-"
            blocks = f" ({r[pre + 'blocks']})" if mode == "block" else ""
            lines.append(
                f"| {r['model']} | {r['granularity']} | {mode} | {r['metric']} | {fp32} | "
                f"{r['nearest']:.2f} | {r[mode]:.2f} | {r[mode] - r['nearest']:+.2f} | "
                f"{sqnr} | {kept} | "
                f"{r.get(pre + 'improved', 0)}/{r.get(pre + 'layers', 0)}{blocks} | "
                f"{r['nearest_s']:.0f} / {r[mode + '_s']:.0f} | "
                f"{r[mode + '_s'] / r['nearest_s']:.1f}x | "
                f"{r.get(mode + '_cpu_s', math.nan):.0f} | {load} |")
    return "\n".join(lines)


def cpu_line() -> str:
    import os

    from onnxrep.cpu import cpu_info

    info = cpu_info()
    flags = " ".join(k for k, v in info.flags.items() if v) or "none"
    return f"{info.model}, {os.cpu_count()} logical CPUs; ISA flags: {flags}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT))
    p.add_argument("--granularity", default="per-tensor,per-channel")
    p.add_argument("--roundings", default="learned",
                   help="learned modes to compare with nearest: learned, block or both")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--save", type=Path, help="write the rows as JSON after every model")
    p.add_argument("--from-json", type=Path, help="print the table of an earlier --save")
    args = p.parse_args(argv)
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        print(markdown(doc["rows"], doc["cpu"]))
        return 0
    cpu = cpu_line()
    print(f"CPU: {cpu}", file=sys.stderr, flush=True)
    rows = []
    for name in args.models.split(","):
        for gran in args.granularity.split(","):
            try:
                row = bench(name, gran, args.calib, args.test,
                            tuple(args.roundings.split(",")))
            except Exception as exc:  # one model's failure must not lose the others
                row = {"model": name, "granularity": gran,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.save:
                args.save.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    print(markdown(rows, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
