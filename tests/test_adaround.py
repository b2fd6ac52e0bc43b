"""Learned rounding (AdaRound): codes, export, the held-out guard, the config hook and the CLI."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphs import Chain, batch_for  # noqa: E402
from onnxrep import verify  # noqa: E402
from onnxrep.cli import main  # noqa: E402
from onnxrep.errors import InputError  # noqa: E402
from onnxrep.ptq.quantizer import QuantizeConfig, quantize_with_details  # noqa: E402
from onnxrep.training import adaround  # noqa: E402
from onnxrep.training.adaround import AdaRoundConfig, learn_rounding  # noqa: E402

FAST = AdaRoundConfig(iterations=200)


def _net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> depthwise Conv -> Relu -> 1x1 Conv -> GAP -> Flatten -> Gemm (transB=0)
    -> MatMul: every moment-form layer kind."""
    c = Chain(channels=3, hw=(8, 8), seed=seed).conv(8).relu().conv(8, group=8).relu()
    return c.conv(12, k=1).gap().flatten().gemm(10, trans_b=False).matmul(5).build()


def _quantized(model, per_channel: bool, n: int = 64):
    x = batch_for(model, n, seed=1)
    q = quantize_with_details(model, x, QuantizeConfig(per_channel=per_channel))
    batches = [{"input": x[i:i + 16]} for i in range(0, n, 16)]
    return q, batches


def _weight_dqs(qdq: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """{layer name: the DequantizeLinear of its weight}."""
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: dq_of[n.input[1]] for n in qdq.graph.node
            if n.op_type in adaround.LAYER_OPS and n.input[1] in dq_of}


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _run_dq_outputs(model: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    """onnxruntime's values of the given tensors (weight DQ outputs need no input)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    feeds = {v.name: np.zeros([d.dim_value or 1 for d in v.type.tensor_type.shape.dim],
                              np.float32) for v in m.graph.input}
    return verify.session(m).run(names, feeds)


@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_codes_export_bit_exact_and_deterministic(per_channel):
    model = _net()
    q, batches = _quantized(model, per_channel)
    out, record = learn_rounding(q.float_model, q.model, batches, FAST)
    again, _ = learn_rounding(q.float_model, q.model, batches, FAST)
    assert record.kept
    assert {r.op_type for r in record.layers} == {"Conv", "Gemm", "MatMul"}
    assert record.samples == 48 and record.held_out == 16
    dqs = _weight_dqs(out)
    changed = 0
    for r in record.layers:
        dq = dqs[r.node]
        codes, scale = _init(out, dq.input[0]), _init(out, dq.input[1])
        assert np.array_equal(codes, _init(again, dq.input[0]))  # seeded: same codes
        nearest = _init(q.model, dq.input[0])
        w = numpy_helper.to_array(next(
            t for t in q.float_model.graph.initializer
            if t.name == next(n for n in q.float_model.graph.node if n.name == r.node).input[1]))
        axis = adaround._broadcast(scale, w.shape, dq.attribute[0].i if dq.attribute else None)
        # every learned code rounds w / s down or up
        step = codes.astype(np.int64) - np.floor(w / axis.astype(np.float32)).astype(np.int64)
        assert set(np.unique(step)) <= {0, 1}
        changed += int(np.sum(codes != nearest))
        assert int(np.sum(codes != nearest)) == (r.changed if r.kept else 0)
        # onnxruntime's dequantized weight == the torch fake-quant weight, bit for bit
        (deq,) = _run_dq_outputs(out, [dq.output[0]])
        fake = ((torch.from_numpy(codes.astype(np.float32)) - 0.0)
                * torch.from_numpy(np.ascontiguousarray(axis, np.float32))).numpy()
        assert deq.dtype == np.float32 and np.array_equal(deq.view(np.int32),
                                                          fake.view(np.int32))
    assert changed > 0
    assert all(r.loss_learned < r.loss_nearest and r.held_learned < r.held_nearest
               for r in record.layers if r.kept)
    # int32 biases and every scale unchanged
    learned_names = {dqs[r.node].input[0] for r in record.layers}
    for t in q.model.graph.initializer:
        if t.name not in learned_names:
            assert np.array_equal(numpy_helper.to_array(t), _init(out, t.name)), t.name


def _simulate(qdq: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """A torch simulation of the fake-quant model: Q/DQ as float rounding, float layers."""
    env = {"input": torch.from_numpy(x)}
    env.update({t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
                for t in qdq.graph.initializer})
    for n in qdq.graph.node:
        a = [env[i] if i else None for i in n.input]
        axis = next((at.i for at in n.attribute if at.name == "axis"), 1)

        def chan(v, ref):
            shape = [1] * ref.ndim
            shape[axis] = -1
            return v.reshape(shape) if v.numel() > 1 else v
        if n.op_type == "QuantizeLinear":
            lo, hi = (0, 255) if a[2].dtype == torch.uint8 else (-128, 127)
            y = torch.clamp(torch.round(a[0] / chan(a[1], a[0])) + chan(a[2], a[0]).float(),
                            lo, hi).to(a[2].dtype)
        elif n.op_type == "DequantizeLinear":
            zp = chan(a[2], a[0]) if len(a) > 2 and a[2] is not None else 0
            y = (a[0].to(torch.int64) - (zp.to(torch.int64) if torch.is_tensor(zp) else 0)
                 ).float() * chan(a[1], a[0])
        elif n.op_type == "Conv":
            at = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            y = F.conv2d(a[0], a[1], a[2], at.get("strides", [1, 1]), at["pads"][:2], 1,
                         at.get("group", 1))
        elif n.op_type == "Relu":
            y = torch.relu(a[0])
        elif n.op_type == "GlobalAveragePool":
            y = a[0].mean((2, 3), keepdim=True)
        elif n.op_type == "Flatten":
            y = a[0].flatten(1)
        elif n.op_type == "Gemm":
            tb = next((at.i for at in n.attribute if at.name == "transB"), 0)
            y = a[0] @ (a[1].T if tb else a[1]) + (a[2] if len(a) > 2 else 0)
        elif n.op_type == "MatMul":
            y = a[0] @ a[1]
        else:
            raise AssertionError(n.op_type)
        env[n.output[0]] = y
    return env[qdq.graph.output[0].name].numpy()


def test_onnxruntime_int8_matches_the_fake_quant_simulation():
    model = _net(seed=2)
    q, batches = _quantized(model, per_channel=True)
    out, record = learn_rounding(q.float_model, q.model, batches, FAST)
    assert record.kept
    x = batch_for(model, 32, seed=5)
    int8 = verify.session(out, optimized=True).run(None, {"input": x})[0]  # integer kernels
    sim = _simulate(out, x)
    noise = float(np.sum((sim.astype(np.float64) - int8) ** 2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(np.sum(sim.astype(np.float64) ** 2) / noise)
    assert sqnr > 30, sqnr  # measured: bit-identical here (QLinearConv, QGemm, QLinearMatMul)


def test_guard_keeps_nearest_when_learned_scores_lower(monkeypatch):
    model = _net(seed=3)
    q, batches = _quantized(model, per_channel=False)

    def bad(layer, xq, xf, hq, hf, cfg, gen):  # claims lower losses, returns far codes
        r = adaround._Rounder(layer)
        return torch.clamp(r.nearest + 9, r.lo, r.hi), [1.0, 0.5], [1.0, 0.5], r

    monkeypatch.setattr(adaround, "_learn_moments", bad)
    out, record = learn_rounding(q.float_model, q.model, batches, FAST)
    assert not record.kept and out is q.model
    assert record.sqnr_learned < record.sqnr_nearest
    assert "discarded" in record.summary()


def _upsampler(kernel: int, pads: int) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose (stride 2, with a bias)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (6, 4, kernel, kernel)).astype(np.float32)  # [Cin, Cout, k, k]
    b2 = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["out"], name="up",
                              strides=[2, 2], pads=[pads] * 4)]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(b2, "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_conv_transpose_learns_on_minibatches():
    q, batches = _quantized(_upsampler(kernel=3, pads=1), per_channel=False, n=32)
    out, record = learn_rounding(q.float_model, q.model, batches, AdaRoundConfig(iterations=100))
    methods = {r.node: r.method for r in record.layers}
    assert methods.get("up") == "minibatch" and methods.get("conv") == "moments"
    assert record.sqnr_learned is not None and math.isfinite(record.sqnr_learned)


@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_transpose_with_kernel_equal_to_stride_learns_on_moments(per_channel, monkeypatch):
    """Its moment form (one linear map per input position) measures the error running the
    layer measures, and learning lowers it."""
    q, batches = _quantized(_upsampler(kernel=2, pads=0), per_channel=per_channel, n=32)
    cfg = AdaRoundConfig(iterations=100, max_positions=10**6)
    _, record = learn_rounding(q.float_model, q.model, batches, cfg)
    up = next(r for r in record.layers if r.node == "up")
    assert up.method == "moments" and up.kept and up.loss_learned < up.loss_nearest
    monkeypatch.setattr(adaround, "_patchwise", lambda layer: False)
    _, run = learn_rounding(q.float_model, q.model, batches, cfg)
    ran = next(r for r in run.layers if r.node == "up")
    assert ran.method == "minibatch"
    assert ran.loss_nearest == pytest.approx(up.loss_nearest, rel=1e-4)
    assert ran.held_nearest == pytest.approx(up.held_nearest, rel=1e-4)


def test_quantize_config_rounding_and_record():
    with pytest.raises(ValueError, match="rounding"):
        QuantizeConfig(rounding="stochastic")
    model = _net(seed=4)
    before = model.SerializeToString()
    x = batch_for(model, 64, seed=1)
    near = quantize_with_details(model, x, QuantizeConfig())
    assert near.rounding is None
    q = quantize_with_details(model, x, QuantizeConfig(rounding="learned"))
    assert q.rounding is not None and q.rounding.layers and "learned rounding" in q.stages
    assert q.rounding.sqnr_learned is not None
    assert (q.rounding.sqnr_learned > q.rounding.sqnr_nearest) == q.rounding.kept
    assert model.SerializeToString() == before  # input untouched


def test_cli_rounding_json_and_missing_torch(tmp_path, capsys, monkeypatch):
    model = _net(seed=5)
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, input=batch_for(model, 64, seed=1))
    assert main(["quantize", str(src), "--calib", str(calib), "--rounding", "learned",
                 "--analysis-samples", "8", "--rounding-samples", "32", "-o",
                 str(tmp_path / "q.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rounding = doc["rounding"]
    assert rounding["mode"] == "learned" and rounding["layers"]
    assert rounding["samples"] + rounding["held_out"] == 32
    assert all(r["iterations"] > 0 for r in rounding["layers"])
    assert main(["quantize", str(src), "--calib", str(calib), "--rounding", "learned",
                 "-o", str(tmp_path / "q2.onnx"), "--force"]) == 0
    assert "learned rounding on" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["quantize", str(src), "--calib", str(calib), "--rounding", "learned",
                 "-o", str(tmp_path / "q3.onnx")]) == 2
    assert "pip install 'onnxrep[qat]'" in capsys.readouterr().err
    with pytest.raises(InputError, match="onnxrep\\[qat\\]"):
        quantize_with_details(model, batch_for(model, 16), QuantizeConfig(rounding="learned"))


def test_learned_rounding_learns_on_more_samples_than_bias_correction():
    """Bias correction keeps its analysis samples; learned rounding gets rounding_samples
    (never fewer), a quarter of them held out, and the nearest model it starts from is the one
    nearest rounding returns."""
    model = _net(seed=6)
    x = batch_for(model, 64, seed=1)
    config = QuantizeConfig(analysis_samples=8, rounding_samples=32, optimize=False)
    near = quantize_with_details(model, x, config, batch_size=4)
    q = quantize_with_details(model, x, replace(config, rounding="learned"), batch_size=4)
    assert near.bias.samples == q.bias.samples == 8
    assert (q.rounding.samples, q.rounding.held_out) == (24, 8)
    if not q.rounding.kept:
        assert q.model.SerializeToString() == near.model.SerializeToString()
    few = quantize_with_details(model, x, replace(config, rounding="learned",
                                                  rounding_samples=4), batch_size=4)
    assert few.rounding.samples + few.rounding.held_out == 8
    with pytest.raises(ValueError, match="rounding_samples"):
        QuantizeConfig(rounding_samples=0)


def test_layer_budget_bounds_the_iterations_of_costly_layers():
    """A moment-form layer learns for min(iterations, max(min_iterations, budget / cost))
    iterations, cost = Cout (K+1)^2 multiply-adds; without a budget every layer gets all."""
    model = _net(seed=7)
    q, batches = _quantized(model, per_channel=False)
    cfg = AdaRoundConfig(iterations=200, layer_budget=2e5, min_iterations=20)
    _, record = learn_rounding(q.float_model, q.model, batches, cfg)
    weights = {n.input[1]: numpy_helper.to_array(t).shape for n in q.float_model.graph.node
               for t in q.float_model.graph.initializer if len(n.input) > 1
               and t.name == n.input[1]}
    nodes = {n.name: n for n in q.float_model.graph.node}
    for r in record.layers:
        node = nodes[r.node]
        shape = weights[node.input[1]]
        if node.op_type == "Conv":
            cout, k = shape[0], int(np.prod(shape[1:]))
        elif node.op_type == "Gemm":  # transB=0: [K, Cout]
            k, cout = shape
        else:  # MatMul [K, Cout]
            k, cout = shape
        assert r.iterations == min(200, max(20, int(2e5 // (cout * (k + 1) ** 2))))
    assert len({r.iterations for r in record.layers}) > 1
    _, full = learn_rounding(q.float_model, q.model, batches,
                             AdaRoundConfig(iterations=60, layer_budget=None))
    assert {r.iterations for r in full.layers} == {60}
    assert "iterations" in full.table() and "60 iterations" in full.summary()
