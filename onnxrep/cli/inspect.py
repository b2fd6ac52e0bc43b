"""Show per-layer weight statistics, outliers, and which layer pairs CLE can equalize.

Flags layers with max |w| > 100 or spread > 10. Lists every equalizable pair and, for each
other Conv/Gemm, why CLE leaves it alone. Given two models (e.g. before and after optimize),
the table shows them side by side. --plot writes per-channel weight ranges as a PNG.
With --calib, also measures every layer's output over the data (one onnxruntime pass) and
shows where per-tensor activation quantization hurts: the tensor's range against the median
range of its channels, dead channels, and channels left with fewer than 16 of the 256 INT8
levels (ranges after the ReLU where one follows, as onnxruntime quantizes them).

example: onnxrep inspect models/mobileone_fmnist.onnx mobileone.opt.onnx --plot ranges.png
         onnxrep inspect models/mobileone_fmnist.onnx --calib models/fmnist_calib.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxrep.analysis.statistics import COARSE_LEVELS, activation_ranges, collect_statistics
from onnxrep.cli.common import add_calib, add_reporting, calib_dataset, emit_json
from onnxrep.cli.optimize import layer_table
from onnxrep.cli.optimize import SUBGRAPH_REASON
from onnxrep.ir.graph import GraphIndex, subgraph_layers
from onnxrep.passes.base import Skip
from onnxrep.errors import InputError
from onnxrep.ir.model import atomic_output, check_output_path, load
from onnxrep.passes.equalize import find_pairs
from onnxrep.analysis.weights import plot_ranges, weight_stats
from onnxrep.report import fmt, table


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model")
    p.add_argument("other", nargs="?", help="a second model to compare (e.g. the optimized one)")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="write per-channel weight ranges of the widest-spread layers")
    add_calib(p, required=False)
    add_reporting(p)


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")


def check_plot(args: argparse.Namespace) -> None:
    """Before any work: a format matplotlib writes, matplotlib installed, a path that is no
    input and no device."""
    ext = args.plot.suffix.lower().lstrip(".")
    if ext not in PLOT_FORMATS:
        raise InputError(f"{args.plot}: unknown plot format '{args.plot.suffix or '(none)'}'; "
                         f"use one of .{', .'.join(PLOT_FORMATS)}", option="plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'onnxrep[plot]'",
                         option="plot") from None
    for model in filter(None, (args.model, args.other)):
        check_output_path(model, args.plot, force=True)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        check_plot(args)
    models = [(args.model, load(args.model))]
    if args.other:
        models.append((args.other, load(args.other)))
    model = models[0][1]
    stats = weight_stats(model)
    pairs, skips = find_pairs(model)
    skips = list(skips) + [Skip(node, f"{SUBGRAPH_REASON} ({where})")
                           for node, where in subgraph_layers(model.graph)]
    labels = GraphIndex(model.graph).labels
    pair_rows = [[labels[p.first], labels[p.second],
                  " -> ".join(model.graph.node[i].op_type for i in p.path) or "-"] for p in pairs]
    other_stats = weight_stats(models[1][1]) if args.other else None
    if args.plot:
        if not stats:
            raise InputError(f"nothing to plot: {args.model} has no Conv/Gemm/MatMul layer with "
                             "constant weights", option="plot")
        with atomic_output(args.plot, force=True) as tmp:
            plot_ranges([(Path(name).name, m) for name, m in models], str(tmp))
    activations = samples = None
    if args.calib:
        measured = collect_statistics(model, calib_dataset(args, model))
        activations, samples = activation_ranges(model, measured), measured.samples
    if args.json:
        emit_json("inspect", {
            "model": args.model, "layers": [s.as_dict() for s in stats],
            "other": {"model": args.other, "layers": [s.as_dict() for s in other_stats]}
            if other_stats else None,
            "pairs": [dict(zip(("first", "second", "through"), r)) for r in pair_rows],
            "skipped": [vars(s) for s in skips], "plot": str(args.plot) if args.plot else None,
            "activations": None if activations is None else {
                "samples": samples, "layers": [a.as_dict() for a in activations]}})
        return 0
    if other_stats:
        print(layer_table(stats, other_stats))
    else:
        print(table(["layer", "op", "shape", "group", "max|w|", "spread", "int8 SQNR dB", ""],
                    [[s.node, s.op, "x".join(map(str, s.shape)), s.groups, fmt(s.max_abs),
                      fmt(s.spread), f"{s.sqnr_db:.1f}", "OUTLIER" if s.outlier else ""]
                     for s in stats], "llllrrrl"))
    print(f"\nCLE pairs ({len(pairs)}):")
    print(table(["first", "second", "through"], pair_rows, "lll") if pairs else "  none")
    if skips:
        print(f"\nnot equalized ({len(skips)}):")
        print(table(["layer", "reason"], [[s.node, s.reason] for s in skips], "ll"))
    if activations is not None:
        print(f"\nactivation ranges over {samples} samples (after the ReLU where one follows):")
        print(activation_table(activations))
    outliers = sum(s.outlier for s in stats)
    if not stats:
        print("\nnothing to equalize: no Conv/ConvTranspose/Gemm/MatMul layer with constant "
              "weights in the main graph")
    print(f"\n{len(stats)} weight layers, {outliers} flagged (max|w| > 100 or spread > 10), "
          f"{len(pairs)} CLE pairs" + (f"; plot: {args.plot}" if args.plot else ""))
    if activations is not None:
        hurt = sum(a.coarse > 0 for a in activations)
        print(f"{hurt} of {len(activations)} layer outputs leave a channel with fewer than "
              f"{COARSE_LEVELS} of 256 levels under per-tensor INT8")
    return 0


def activation_table(rows) -> str:
    """Per-tensor range vs median per-channel range of each layer output."""
    return table(["layer", "op", "tensor range", "median channel", "ratio", "dead",
                  f"<{COARSE_LEVELS} levels", ""],
                 [[a.node, a.op + ("+Relu" if a.relu else ""),
                   f"[{fmt(a.lo)}, {fmt(a.hi)}]", fmt(a.median_width), fmt(a.ratio),
                   f"{a.dead}/{a.channels}", a.coarse, "!" if a.coarse else ""]
                  for a in rows], "llrrrrrl")
