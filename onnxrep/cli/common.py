"""Option groups and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from onnxrep.data import ImageOptions, as_dataset
from onnxrep.errors import InputError
from onnxrep.ir.model import check_input_file, check_output_path, default_output

SCHEMA_VERSION = 1


def add_output(p: argparse.ArgumentParser, suffix: str) -> None:
    p.add_argument("-o", "--output", type=str, metavar="OUT",
                   help=f"output model (default: <input stem>.{suffix}.onnx beside the input); "
                        f"a directory (a trailing slash, or one that exists) gets "
                        f"<input stem>.{suffix}.onnx inside it. Never the input, a file it "
                        "reads (external data), or a device/FIFO")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(output_suffix=suffix)


def add_reporting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or log on stderr")


def add_input_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DxDx...",
                   help="concrete shape for a symbolic input, e.g. input:1x3x224x224 "
                        "(repeatable); other symbolic dims: batch 2, others 64")


BATCH_HELP = ("samples per onnxruntime run (default: as many as fit 512 KiB of input, at most "
              "32; a model's fixed batch dim wins)")


def add_calib(p: argparse.ArgumentParser, *, required: bool) -> None:
    """--calib DATA, --calib-limit N, --batch-size N (the words `onnxrep quantize` uses) and
    the image-folder options."""
    p.add_argument("--calib", required=required, metavar="DATA",
                   help="calibration data: .npz (arrays keyed by input name), .npy, or a folder "
                        "of images")
    p.add_argument("--calib-limit", type=positive_int, metavar="N", help="use at most N samples")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help=BATCH_HELP)
    add_image_options(p)


def calib_dataset(args: argparse.Namespace, model):
    return read_data(args, args.calib, model, limit=args.calib_limit)


_IMAGE_FLAGS = ("resize", "mean", "std", "scale", "layout", "grayscale")


def add_image_options(p: argparse.ArgumentParser) -> None:
    """How a folder of images becomes inputs; applies to every data flag that names a folder."""
    g = p.add_argument_group("image folders (defaults: the model's size, layout and channels)")
    g.add_argument("--resize", type=_size, metavar="HxW", help="resize images to H x W")
    g.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help="subtracted after scaling, one value or one per channel (default 0)")
    g.add_argument("--std", type=_floats, metavar="S[,S,S]",
                   help="divides after subtracting the mean (default 1)")
    g.add_argument("--scale", type=positive_float, help="pixel multiplier (default 1/255)")
    g.add_argument("--layout", choices=("NCHW", "NHWC"))
    color = g.add_mutually_exclusive_group()
    color.add_argument("--grayscale", dest="grayscale", action="store_const", const=True,
                       help="read images as one channel")
    color.add_argument("--rgb", dest="grayscale", action="store_const", const=False,
                       help="read images as three channels")


def read_data(args: argparse.Namespace, source, model, *, limit: int | None = None,
              batch_size: int | None = None):
    """The one way a command turns a data flag into a Dataset: ``--batch-size`` (or
    ``batch_size``), and the image options when ``source`` is a folder."""
    folder = Path(source).is_dir()
    return as_dataset(source, model, batch_size=batch_size or getattr(args, "batch_size", None),
                      limit=limit, image_options=_image_options(args) if folder else None)


def _image_options(args: argparse.Namespace) -> ImageOptions | None:
    given = {k: getattr(args, k) for k in _IMAGE_FLAGS if getattr(args, k) is not None}
    if not given:
        return None
    try:
        return ImageOptions(**given)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HxW such as 224x224, got '{text}'")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
        if all(math.isfinite(v) for v in values):
            return values
        raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got '{text}'") from None



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
    check_input_file(args.model, "an .onnx file")
    out = args.output or default_output(args.model, args.output_suffix)
    return check_output_path(args.model, out, args.force, suffix=args.output_suffix)


# ---- numeric option types (argparse ``type=``): bad values exit 2 at parse time ----------------

def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got '{text}'") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got '{text}'")
    return value


def bounded(kind=float, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite ``kind`` in [lo, hi] (open ends with ``lo_open``/``hi_open``)."""
    def parse(text: str):
        value = _number(text, kind)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if lo_open else '>='} {lo:g}, got '{text}'")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(
                f"must be {'<' if hi_open else '<='} {hi:g}, got '{text}'")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <type> value"
    return parse


positive_int = bounded(int, lo=1)
nonnegative_int = bounded(int, lo=0)
finite_float = bounded(float)
positive_float = bounded(float, lo=0, lo_open=True)
nonnegative_float = bounded(float, lo=0)
tolerance = bounded(float, lo=0)  # --rtol: 0 means exact


def steps_or_never(text: str) -> int | None:
    """A step count >= 0, or ``never`` (None)."""
    if text == "never":
        return None
    try:
        return nonnegative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a step count >= 0 or 'never', got '{text}'") from None


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


def add_single_pass(p: argparse.ArgumentParser, suffix: str) -> None:
    """The options of a command whose whole job is one equivalence-preserving pass."""
    p.add_argument("model", help="input ONNX model (never modified)")
    add_output(p, suffix)
    p.add_argument("--rtol", type=tolerance, default=1e-5,
                   help="largest relative output error accepted (default %(default)g)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare outputs before/after with onnxruntime (default on)")
    add_input_shape(p)
    add_reporting(p)


def run_single_pass(args: argparse.Namespace, stage):
    """Run ``stage`` (a :class:`onnxrep.passes.base.Stage`) on the model in ``args``, verified
    on seeded inputs (strict: exit 3 past --rtol, nothing written), and write the result.
    Returns (output path, pass result, comparison or None)."""
    from onnxrep import verify
    from onnxrep.ir.model import load, save
    from onnxrep.passes.base import PassManager, Verifier

    out = output_path(args)
    model = load(args.model)
    verifier = None
    if args.verify:
        feeds = verify.random_inputs(model, parse_input_shapes(args.input_shape))
        verifier = Verifier(model, feeds, rtol=args.rtol, bounds=verify.output_bounds(model))
    done = PassManager([stage], verifier=verifier).run(model)  # in place: the file is the input
    (_, result), comparison = done.results[0], done.comparison
    if verifier is not None and comparison is None:  # nothing changed: exact
        comparison = verify.compare_outputs(verifier.reference, verifier.reference)
    save(model, out, force=args.force)
    return out, result, comparison
