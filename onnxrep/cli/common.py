"""Option groups and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from onnxrep.data.readers import load_data
from onnxrep.errors import InputError
from onnxrep.ir.model import check_output_path, default_output

SCHEMA_VERSION = 1


def add_output(p: argparse.ArgumentParser, suffix: str) -> None:
    p.add_argument("-o", "--output", type=Path,
                   help=f"output model (default: <input stem>.{suffix}.onnx beside the input)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(output_suffix=suffix)


def add_reporting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or log on stderr")


def add_input_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DxDx...",
                   help="concrete shape for a symbolic input, e.g. input:1x3x224x224 "
                        "(repeatable); other symbolic dims: batch 2, others 64")


def add_calib(p: argparse.ArgumentParser, *, required: bool) -> None:
    """--calib DATA, --calib-limit N, --batch-size N (the words `onnxrep quantize` uses)."""
    p.add_argument("--calib", required=required, metavar="DATA",
                   help="calibration data: .npz (arrays keyed by input name), .npy, or a folder "
                        "of images")
    p.add_argument("--calib-limit", type=int, metavar="N", help="use at most N samples")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="samples per onnxruntime run (default 32)")


def calib_dataset(args: argparse.Namespace, model):
    return load_data(args.calib, model, batch_size=args.batch_size, limit=args.calib_limit)


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if not sep or not name or any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(f"--input-shape '{spec}': expected NAME:1x3x224x224") from None
        shapes[name] = shape
    return shapes


def output_path(args: argparse.Namespace) -> Path:
    """The checked output path: default beside the input, never the input itself."""
    out = args.output or default_output(args.model, args.output_suffix)
    return check_output_path(args.model, out, args.force)


def emit_json(command: str, payload: dict) -> None:
    doc = {"schema": f"onnxrep.{command}", "schema_version": SCHEMA_VERSION, **payload}
    json.dump(_finite(json.loads(json.dumps(doc, default=_default))), sys.stdout, indent=2,
              allow_nan=False)
    sys.stdout.write("\n")


def _default(obj):
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _finite(obj):
    """JSON has no inf/nan: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
