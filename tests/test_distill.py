"""Distillation without labels: the loss per output by what it holds, on multi-output models
(a detector's Sigmoid map beside a classifier's Softmax), through QAT, export and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxrep import verify  # noqa: E402
from onnxrep.cli import main  # noqa: E402
from onnxrep.errors import InputError  # noqa: E402
from onnxrep.training.config import Distill, QATConfig  # noqa: E402
from onnxrep.training.distill import (Kind, distill_loss, kl_probabilities,  # noqa: E402
                                      normalized_mse, output_kinds)
from onnxrep.training.train import qat_with_details  # noqa: E402


def _two_heads(opset=13, softmax_axis=None, identity=True) -> onnx.ModelProto:
    """x [N,1,12,12] -> Conv 8 -> Relu -> {Conv 1x1 -> Sigmoid: "map" [N,1,12,12];
    GAP -> Flatten -> Gemm 4 -> Softmax (-> Identity): "probs" [N,4]; Gemm: "logits" [N,4]}."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w1": f(8, 1, 3, 3), "b1": f(8), "w2": f(1, 8, 1, 1), "b2": f(1), "wg": f(4, 8),
        "bg": f(4)}.items()]
    soft = {} if softmax_axis is None else {"axis": softmax_axis}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("Sigmoid", ["c2"], ["map"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["fl"]),
             helper.make_node("Gemm", ["fl", "wg", "bg"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["p" if identity else "probs"], **soft)]
    if identity:
        nodes.append(helper.make_node("Identity", ["p"], ["probs"]))
    out = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    graph = helper.make_graph(nodes, "two_heads", [out("x", ["N", 1, 12, 12])],
                              [out("map", ["N", 1, 12, 12]), out("probs", ["N", 4]),
                               out("logits", ["N", 4])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _data(n=64, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 1, 12, 12)).astype(np.float32)}


def _kinds(model, shapes):
    return [k.kind(torch.zeros(s)) for k, s in zip(output_kinds(model), shapes)]


def test_outputs_are_classified_by_the_node_that_makes_them():
    shapes = [(2, 1, 12, 12), (2, 4), (2, 4)]
    assert _kinds(_two_heads(), shapes) == [Kind.OTHER, Kind.PROBABILITIES, Kind.LOGITS]
    # opset < 13 Softmax normalizes the flattened axes from `axis` on: a distribution over
    # that axis only when it is the last one (a CTC recognizer's axis 2 of [N, T, C])
    assert _kinds(_two_heads(11, identity=False), shapes)[1] is Kind.PROBABILITIES
    ctc = output_kinds(_two_heads(11, softmax_axis=2))[1]
    assert ctc.kind(torch.zeros(2, 5, 7)) is Kind.PROBABILITIES
    assert ctc.kind(torch.zeros(2, 5, 7, 3)) is Kind.OTHER


def test_losses_are_zero_at_the_teacher_and_measure_what_they_claim():
    rng = torch.Generator().manual_seed(0)
    t = torch.softmax(torch.randn(3, 5, 7, generator=rng), -1)
    s = torch.softmax(torch.randn(3, 5, 7, generator=rng), -1)
    assert float(kl_probabilities(t, t, 2)) == pytest.approx(0, abs=1e-6)
    expected = (t * (t.log() - s.log())).sum(-1).mean()
    assert float(kl_probabilities(s, t, 2)) == pytest.approx(float(expected), rel=1e-5)
    x = torch.randn(4, 1, 6, 6, generator=rng)
    noisy = x + 0.1 * torch.randn(4, 1, 6, 6, generator=rng)
    sqnr = verify.sqnr_db(float(x.pow(2).sum()), float((noisy - x).pow(2).sum()))
    assert float(normalized_mse(noisy, x)) == pytest.approx(10 ** (-sqnr / 10), rel=1e-4)
    # scale-free: a 100x larger output weighs the same
    assert float(normalized_mse(100 * noisy, 100 * x)) == pytest.approx(
        float(normalized_mse(noisy, x)), rel=1e-4)


def test_forced_kl_refuses_a_map_and_forced_mse_takes_every_output():
    model = _two_heads()
    kinds = output_kinds(model)
    t = [torch.rand(2, 1, 12, 12), torch.softmax(torch.randn(2, 4), 1), torch.randn(2, 4)]
    s = [t[0] + 0.05, torch.softmax(t[1].log() + 0.3 * torch.randn(2, 4), 1), t[2] + 0.05]
    with pytest.raises(InputError, match="'map'.*--distill mse"):
        distill_loss(s, t, kinds, Distill.KL)
    mse = distill_loss(s, t, kinds, Distill.MSE)
    assert float(mse) == pytest.approx(sum(float(normalized_mse(a, b)) for a, b in zip(s, t)))
    by_kind = distill_loss(s, t, kinds)
    assert float(by_kind) > 0 and float(distill_loss(t, t, kinds)) == pytest.approx(0, abs=1e-6)


def test_multi_output_model_distils_and_exports():
    model = _two_heads()
    config = QATConfig(batch_size=16, lr=1e-3, calib_samples=32)
    result = qat_with_details(model, _data(64), config=config)
    assert result.steps == 4 and all(np.isfinite(h.loss) for h in result.history)
    assert result.history[0].loss < 0.1  # the student starts at the teacher (+ INT8 noise)
    feeds = _data(8, seed=1)
    outs = verify.run(verify.session(result.model, optimized=True), feeds)
    ref = verify.run(model, feeds)
    assert {k: v.shape for k, v in outs.items()} == {k: v.shape for k, v in ref.items()}
    assert np.allclose(outs["probs"].sum(1), 1, atol=1e-5)


def test_max_minutes_stops_after_the_step_that_crosses_it():
    config = QATConfig(batch_size=8, calib_samples=32, max_minutes=1e-6)
    assert qat_with_details(_two_heads(), _data(64), config=config).steps == 1
    with pytest.raises(ValueError, match="max_minutes"):
        QATConfig(max_minutes=0)


def test_cli_max_minutes_and_distill(tmp_path, capsys):
    onnx.save(_two_heads(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "train.npz", **_data(64))
    out = tmp_path / "m.qat.onnx"
    rc = main(["qat", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "train.npz"),
               "--batch-size", "8", "--calib-samples", "32", "--max-minutes", "1e-6",
               "--distill", "mse", "--json"])
    assert rc == 0 and out.exists()
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    rc = main(["qat", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "train.npz"),
               "--batch-size", "8", "--calib-samples", "32", "--distill", "kl", "--force"])
    assert rc == 2 and "--distill mse" in capsys.readouterr().err


def test_divergence_is_reported_at_its_step_not_as_a_missing_range():
    from onnxrep.errors import TrainingDivergedError

    config = QATConfig(batch_size=8, calib_samples=32, lr=1e12, momentum=0.0,
                       freeze_bn_after=None)  # batch statistics of exploding outputs: NaN
    with pytest.raises(TrainingDivergedError, match="diverged at step .*lower"):
        qat_with_details(_two_heads(), _data(64), config=config)
