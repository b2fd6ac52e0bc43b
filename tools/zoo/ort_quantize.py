"""onnxruntime alone: its documented static-quantization flow, one model, as a script.

1. per-channel on a model below opset 13: onnx.version_converter to opset 13 first (QDQ with
   per-channel scales needs the `axis` attribute of QuantizeLinear, opset 13);
2. onnxruntime.quantization.shape_inference.quant_pre_process (symbolic shape inference with
   auto_merge=True, ONNX shape inference, onnxruntime's optimizer); if it raises, once more
   with skip_symbolic_shape=True, and the fallback is reported;
3. quantize_static: QDQ, QUInt8 activations, QInt8 weights, MinMax, per_channel as asked,
   calibrated on every sample of the npz, one sample per run (its examples' reader).

Run it in a scratch working directory: quant_pre_process and the calibrator leave files in
the cwd. Prints one JSON line {"steps": [...], "notes": [...]} on success; exits 1 with the
error on its last stderr line otherwise.

usage: python ort_quantize.py MODEL CALIB.npz OUT.onnx [--per-channel]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("calib", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--per-channel", action="store_true")
    args = p.parse_args(argv)

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    steps, notes = [], []
    src = args.model
    work = Path.cwd()
    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if args.per_channel and opset < 13:
        from onnx import version_converter

        src = work / "opset13.onnx"
        onnx.save(version_converter.convert_version(model, 13), str(src))
        steps.append(f"version_converter {opset}->13")
    del model

    pre = work / "pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), auto_merge=True)
        steps.append("quant_pre_process(auto_merge=True)")
    except Exception as exc:  # the fallback is part of the result: say so
        first = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}" \
            if str(exc).strip() else type(exc).__name__
        notes.append(f"quant_pre_process(auto_merge=True) failed ({first}); "
                     "fell back to skip_symbolic_shape=True")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        steps.append("quant_pre_process(skip_symbolic_shape=True)")

    with np.load(args.calib) as z:
        (name, data), = z.items()
        data = data.astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(len(data)))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {name: data[i:i + 1]}

    quantize_static(str(pre), str(args.output), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, per_channel=args.per_channel)
    steps.append(f"quantize_static(QDQ, QUInt8/QInt8, MinMax, per_channel={args.per_channel}, "
                 f"{len(data)} samples)")
    print(json.dumps({"steps": steps, "notes": notes}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exc()
        msg = str(exc).strip().splitlines()
        print(f"error: {type(exc).__name__}: {msg[0][:200] if msg else ''}", file=sys.stderr)
        sys.exit(1)
