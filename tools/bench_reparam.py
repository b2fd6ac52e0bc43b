"""INT8 accuracy of train-form Rep models quantized directly vs after `onnxrep reparam`.

For each architecture (the RepVGG and MobileOne of models/): load the trained train-form
weights that `python -m models.train` saves (<workdir>/<arch>/final_train_form.pt; trained
here first, with the shipped recipe, when missing: about 8 and 15 minutes on 2 cores), export
the train form with torch's classic exporter (eval mode: torch folds each Conv -> BN pair, the
identity-branch BNs stay), merge it with the Reparameterize pass (checked against the train
form in onnxruntime, and its Conv weights against the torch model's own reparameterize()), then
quantize both forms with `onnxrep quantize` (its defaults: QDQ, uint8 activations, int8
weights, MinMax, its equivalence-preserving passes and bias correction; per-tensor and
per-channel weights), calibrated on models/fmnist_calib.npz. Top-1 on the full Fashion-MNIST
test set (10k images, Debian's dataset-fashion-mnist, preprocessed with the constants recorded
in models/fmnist_eval.npz). Prints markdown tables.

Retraining is deterministic on one machine for a given torch build and thread count, but not
bit-identical to the run that made the shipped models/*.onnx (see models/README.md); the
weights measured are the ones in --workdir, whose deploy form is reported beside the table.

usage: python tools/bench_reparam.py [--workdir /tmp/onnxrep-train] [--arch repvgg mobileone]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
MODELS = ROOT / "models"
CALIB = MODELS / "fmnist_calib.npz"

from bench_ptq import FMNIST, test_set  # noqa: E402  (one Fashion-MNIST reader)


def checkpoint(arch: str, workdir: Path) -> Path:
    path = workdir / arch / "final_train_form.pt"
    if not path.exists():
        print(f"[{arch}] {path} missing: training with models/train.py's defaults "
              f"(outputs to {workdir / ('out-' + arch)}, the shipped files are not touched)",
              file=sys.stderr)
        subprocess.run([sys.executable, "-m", "models.train", "--arch", arch, "--workdir",
                        str(workdir), "--out-dir", str(workdir / f"out-{arch}")],
                       cwd=ROOT, check=True)
    return path


def export(net, path: Path) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load(str(path))


def top1(model, data: dict, speed: bool = False):
    """Top-1 in %; with ``speed`` also samples/s (onnxruntime, optimizations on, the model's
    own run time as `onnxrep eval` counts it)."""
    from onnxrep.evaluation import evaluate

    result = evaluate(model, data, batch_size=250)
    return (100 * result.top1, result.samples_per_second) if speed else 100 * result.top1


def conv_stats(model: onnx.ModelProto) -> tuple[int, float]:
    """(Conv nodes, largest |w| over Conv weights)."""
    from onnxrep.ir.graph import GraphIndex

    index = GraphIndex(model.graph)
    worst, convs = 0.0, 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        convs += 1
        name = node.input[1]
        while name in index.producer and index.node(index.producer[name]).op_type == "Identity":
            name = index.node(index.producer[name]).input[0]
        w = index.const(name)
        worst = max(worst, float(np.abs(w).max()))
    return convs, worst


def measure(arch: str, workdir: Path, data: dict, tmp: Path) -> dict:
    import torch

    from models.mobileone import mobileone_fmnist
    from models.repvgg import repvgg_fmnist
    from onnxrep import verify
    from onnxrep.passes.reparameterize import Reparameterize
    from onnxrep.pipeline import OptimizeConfig
    from onnxrep.ptq.quantizer import PASSES_RTOL, QuantizeConfig, quantize

    net = {"repvgg": repvgg_fmnist, "mobileone": mobileone_fmnist}[arch]()
    net.load_state_dict(torch.load(checkpoint(arch, workdir), map_location="cpu"))
    net.eval()
    train = export(net, tmp / f"{arch}.train.onnx")
    deploy = onnx.ModelProto()
    deploy.CopyFrom(train)
    result = Reparameterize()(deploy)
    feeds = {"input": data["input"][:256]}
    check = verify.compare(train, deploy, feeds)
    verify.check(check, 1e-5, "reparam")
    own = export(copy.deepcopy(net).reparameterize(), tmp / f"{arch}.own-deploy.onnx")
    weight_diff = max(float(np.abs(numpy_of(deploy, a) - numpy_of(own, b)).max())
                      for a, b in zip(convs_of(deploy), convs_of(own)))
    row = {"skips": len(result.skips), "blocks": result.summary.merged,
           "rel": check.rel, "weight_diff": weight_diff}
    for form, model, merge in FORMS_OF(train, deploy):
        convs, worst = conv_stats(model)
        cells = {"convs": convs, "worst": worst, "fp32": top1(model, data)}
        passes = OptimizeConfig(rtol=PASSES_RTOL, reparameterize=merge)
        for per_channel in (False, True):
            start = time.perf_counter()
            q = quantize(model, str(CALIB), QuantizeConfig(per_channel=per_channel,
                                                           passes=passes))
            cells["seconds", per_channel] = time.perf_counter() - start
            cells[per_channel], cells["speed", per_channel] = top1(q, data, speed=True)
        row[form] = cells
    return row


FORMS = ("train form, quantized without merging (--no-reparam)",
         "train form, `onnxrep quantize` (merges first)", "after `onnxrep reparam`")


def FORMS_OF(train, deploy):  # noqa: N802
    """(label, model, whether quantize's passes may merge) for the three rows."""
    return [(FORMS[0], train, False), (FORMS[1], train, True), (FORMS[2], deploy, True)]


def convs_of(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def numpy_of(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    from onnxrep.ir.graph import GraphIndex

    index = GraphIndex(model.graph)
    return np.concatenate([index.const(node.input[1]).ravel(), index.const(node.input[2]).ravel()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["repvgg", "mobileone"],
                   choices=["repvgg", "mobileone"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/onnxrep-train"),
                   help="where models/train.py keeps <arch>/final_train_form.pt")
    args = p.parse_args(argv)
    missing = [str(x) for x in (CALIB, MODELS / "fmnist_eval.npz",
                                FMNIST / "t10k-images-idx3-ubyte.gz") if not x.exists()]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install dataset-fashion-mnist)",
              file=sys.stderr)
        return 2
    data = test_set()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="onnxrep-bench-reparam-") as tmp:
        for arch in args.arch:
            rows[arch] = measure(arch, args.workdir, data, Path(tmp))
    n = len(data["labels"])
    print(f"Top-1 (%) on the full Fashion-MNIST test set ({n} images), `onnxrep quantize` "
          "defaults, calibration models/fmnist_calib.npz (512 images); in parentheses the "
          "change vs the form's FP32 in points.\n")
    print("| model | form | Convs | max \\|w\\| | FP32 | INT8 per-tensor | INT8 per-channel "
          "| INT8 per-tensor samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for arch, row in rows.items():
        for form in FORMS:
            c = row[form]
            cells = [f"{c[pc]:.2f} ({c[pc] - c['fp32']:+.2f})" for pc in (False, True)]
            print(f"| {arch} | {form} | {c['convs']} | {c['worst']:.3g} | {c['fp32']:.2f} | "
                  + " | ".join(cells) + f" | {c['speed', False]:.0f} |")
    print("\nreparam: blocks merged, blocks left, max rel output error vs the train form (256 "
          "test images), max |difference| from the torch model's own reparameterize() weights:\n")
    for arch, row in rows.items():
        print(f"- {arch}: {row['blocks']} merged, {row['skips']} left, rel {row['rel']:.2e}, "
              f"weights {row['weight_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
