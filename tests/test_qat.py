"""QAT: ONNX -> torch conversion, fake quantization vs onnxruntime QDQ, training, export, CLI."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from graphs import Chain, conv_relu_conv, depthwise_chain, mobileone_like  # noqa: E402
from onnxrep import verify  # noqa: E402
from onnxrep.cli import main  # noqa: E402
from onnxrep.errors import DataError, UnsupportedModelError  # noqa: E402
from onnxrep.training.export import export_qdq  # noqa: E402
from onnxrep.training.fake_quant import FakeQuantConfig, Mode, prepare  # noqa: E402
from onnxrep.training.train import QATConfig, qat, qat_with_details  # noqa: E402
from onnxrep.training.convert import to_torch, weights_to_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PPOCR = Path(os.environ.get("ONNXREP_CACHE", Path.home() / ".cache" / "onnxrep")) / "ppocr" / \
    "ch_PP-OCRv4_det_infer.onnx"
RTOL = 1e-5


def _torch_out(net, feeds) -> dict:
    with torch.no_grad():
        out = net(*[torch.from_numpy(feeds[n]) for n in net.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return {n: o.numpy() for n, o in zip(net.output_names, out)}


def _assert_exact(model, feeds=None):
    feeds = feeds or verify.random_inputs(model)
    cmp = verify.compare_outputs(verify.run(model, feeds), _torch_out(to_torch(model), feeds))
    assert cmp.rel <= RTOL, cmp.summary()
    return cmp


def _single(op, attrs=None, consts=(), shape=(2, 4, 8, 8), opset=17, out_dtype=TensorProto.FLOAT):
    """One node reading ``x`` and constants (None = absent optional input)."""
    inits, names = [], []
    for i, v in enumerate(consts):
        if v is None:
            names.append("")
        else:
            names.append(f"k{i}")
            inits.append(numpy_helper.from_array(np.asarray(v), f"k{i}"))
    node = helper.make_node(op, ["x", *names], ["y"], **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info("y", out_dtype, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _zoo() -> onnx.ModelProto:
    """Conv -> BN -> HardSwish -> MaxPool -> [ConvTranspose -> BN -> PRelu, Resize] -> Concat
    -> Pad -> AveragePool -> Clip -> Mul/Add/Sub/Div -> HardSigmoid, LeakyRelu, Sigmoid ->
    GAP -> Reshape -> MatMul: the op kinds PP-OCR-style and Rep models use."""
    rng = np.random.default_rng(3)
    f = lambda *s: rng.normal(0, 0.5, s).astype(np.float32)  # noqa: E731
    inits = {
        "w1": f(8, 3, 3, 3), "b1": f(8), "s1": np.abs(f(8)) + 0.5, "o1": f(8), "m1": f(8),
        "v1": np.abs(f(8)) + 0.1, "wt": f(8, 8, 2, 2), "s2": np.abs(f(8)) + 0.5, "o2": f(8),
        "m2": f(8), "v2": np.abs(f(8)) + 0.1, "slope": np.abs(f(8, 1, 1)),
        "scales": np.array([1, 1, 2, 2], np.float32), "pads": np.array([0, 0, 1, 0, 0, 0, 0, 1],
                                                                       np.int64),
        "lo": np.array(-1.0, np.float32), "hi": np.array(2.0, np.float32),
        "a": np.array(0.7, np.float32), "c": np.array(0.1, np.float32),
        "shape": np.array([0, -1], np.int64), "wm": f(16, 5),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "s1", "o1", "m1", "v1"], ["bn1"], epsilon=1e-3),
        n("HardSwish", ["bn1"], ["hs"]),
        n("MaxPool", ["hs"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        n("ConvTranspose", ["mp", "wt"], ["ct"], kernel_shape=[2, 2], strides=[2, 2]),
        n("BatchNormalization", ["ct", "s2", "o2", "m2", "v2"], ["bn2"]),
        n("PRelu", ["bn2", "slope"], ["pr"]),
        n("Resize", ["mp", "", "scales"], ["rs"], mode="nearest",
          coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        n("Concat", ["pr", "rs"], ["cat"], axis=1),
        n("Pad", ["cat", "pads"], ["pad"], mode="reflect"),
        n("AveragePool", ["pad"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
          count_include_pad=0),
        n("Clip", ["ap", "lo", "hi"], ["cl"]),
        n("Mul", ["cl", "a"], ["mu"]), n("Add", ["mu", "c"], ["ad"]),
        n("Sub", ["ad", "c"], ["su"]), n("Div", ["su", "a"], ["dv"]),
        n("HardSigmoid", ["dv"], ["hsig"], alpha=0.2, beta=0.5),
        n("LeakyRelu", ["hsig"], ["lr"], alpha=0.1), n("Sigmoid", ["lr"], ["sg"]),
        n("GlobalAveragePool", ["sg"], ["gap"]), n("Reshape", ["gap", "shape"], ["flat"]),
        n("MatMul", ["flat", "wm"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv_bn_relu(seed=0) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm on 1x12x12 inputs."""
    c = Chain(channels=1, hw=(12, 12), seed=seed).conv(8, stride=2)
    rng = np.random.default_rng(seed)
    params = [np.abs(rng.normal(1, 0.2, 8)), rng.normal(0, 0.2, 8), rng.normal(0, 0.3, 8),
              np.abs(rng.normal(1, 0.3, 8)) + 0.1]
    c.node("BatchNormalization", [c.const(p.astype(np.float32), "bn") for p in params])
    c.relu().conv(16, k=1).relu()
    return c.gap().flatten().gemm(4).build()


def _tiny_data(n=256, seed=0, labels=True, hw=12):
    rng = np.random.default_rng(seed)
    data = {"input": rng.standard_normal((n, 1, hw, hw)).astype(np.float32)}
    if labels:
        data["labels"] = rng.integers(0, 4, n)
    return data


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _optimized_ops(model) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return _ops(onnx.load(so.optimized_model_filepath))


def _initializers(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ---- conversion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [conv_relu_conv, depthwise_chain, mobileone_like, _zoo,
                                   _conv_bn_relu])
def test_conversion_is_exact_and_maps_weights_back(build):
    model = build()
    _assert_exact(model)
    net = to_torch(model)
    layers = {type(m).__name__ for m in net.modules()}
    assert {"Conv"} <= layers
    back = weights_to_onnx(net, model)
    feeds = verify.random_inputs(model)
    assert verify.compare(model, back, feeds).rel == 0.0
    for layer in net.weight_layers():  # every weight is a parameter named after its ONNX tensor
        assert layer.onnx_names["weight"] in _initializers(model)
        assert layer.weight.requires_grad


def test_trained_weights_land_under_their_onnx_names():
    model = _zoo()
    net = to_torch(model)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    back = _initializers(weights_to_onnx(net, model))
    before = _initializers(model)
    np.testing.assert_allclose(back["w1"], before["w1"] * 1.5, rtol=1e-6)
    np.testing.assert_allclose(back["wm"], before["wm"] * 1.5, rtol=1e-6)  # MatMul: [in, out]
    np.testing.assert_allclose(back["wt"], before["wt"] * 1.5, rtol=1e-6)
    np.testing.assert_array_equal(back["m1"], before["m1"])  # running stats are buffers


@pytest.mark.parametrize("op,attrs,consts,shape,opset", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1), (),
     (2, 4, 7, 7), 17),
    ("MaxPool", dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]), (),
     (2, 4, 7, 7), 17),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), (), (2, 4, 7, 7), 17),
    ("Resize", dict(mode="linear", coordinate_transformation_mode="half_pixel"),
     (None, np.array([1, 1, 1.5, 2], np.float32)), (2, 4, 8, 8), 17),
    ("Resize", dict(mode="linear", coordinate_transformation_mode="align_corners"),
     (None, None, np.array([2, 4, 5, 11], np.int64)), (2, 4, 8, 8), 17),
    ("Pad", dict(mode="edge"), (np.array([0, 0, 2, 1, 0, 0, 0, 3], np.int64),), (2, 4, 8, 8), 17),
    ("Pad", dict(mode="constant"), (np.array([0, 1, 2, 1, 0, 0, 0, 3], np.int64),
                                    np.array(0.5, np.float32)), (2, 4, 8, 8), 17),
    ("Clip", dict(min=-0.5, max=0.5), (), (2, 4, 8, 8), 6),
    ("Softmax", dict(axis=1), (), (2, 4, 3), 11),
    ("Flatten", dict(axis=2), (), (2, 4, 3, 3), 17),
    ("Transpose", dict(perm=[0, 2, 3, 1]), (), (2, 4, 3, 5), 17),
])
def test_single_ops_match_onnxruntime(op, attrs, consts, shape, opset):
    _assert_exact(_single(op, attrs, consts, shape, opset))


def test_conv_with_asymmetric_and_same_padding():
    w = np.random.default_rng(0).normal(size=(6, 2, 3, 3)).astype(np.float32)
    for attrs in (dict(pads=[0, 1, 2, 0], strides=[2, 1]), dict(auto_pad="SAME_LOWER",
                                                                 strides=[2, 2]),
                  dict(auto_pad="SAME_UPPER", strides=[2, 2]), dict(dilations=[2, 1]),
                  dict(auto_pad="VALID", group=2)):
        ww = w[:, :1] if attrs.get("group") == 2 else w
        _assert_exact(_single("Conv", dict(kernel_shape=[3, 3], **attrs), (ww,), (2, 2, 9, 8)))


@settings(max_examples=30, deadline=None)
@given(cin=st.sampled_from([1, 2, 4]), mult=st.integers(1, 3), k=st.sampled_from([1, 2, 3, 5]),
       stride=st.integers(1, 3), dilation=st.integers(1, 2), depthwise=st.booleans(),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv_conversion_property(cin, mult, k, stride, dilation, depthwise, pads, bias, seed):
    rng = np.random.default_rng(seed)
    group = cin if depthwise else 1
    cout = cin * mult
    consts = [rng.normal(size=(cout, cin // group, k, k)).astype(np.float32)]
    if bias:
        consts.append(rng.normal(size=cout).astype(np.float32))
    model = _single("Conv", dict(kernel_shape=[k, k], strides=[stride, stride], pads=pads,
                                 dilations=[dilation, dilation], group=group), consts,
                    (2, cin, 11, 10))
    _assert_exact(model)


def test_unsupported_ops_are_all_named():
    model = _single("NonZero", shape=(2, 3), out_dtype=TensorProto.INT64)
    with pytest.raises(UnsupportedModelError, match=r"NonZero \(1\)"):
        to_torch(model)


def test_shared_weight_stays_a_buffer():
    c = Chain(channels=4).conv(4)
    w = c.nodes[-1].input[1]
    c.node("Conv", [w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = c.build()
    net = to_torch(model)
    assert not net.weight_layers()  # both convs run as plain ops reading one buffer
    _assert_exact(model)


@pytest.mark.parametrize("name", ["mobileone_fmnist.onnx", "repvgg_fmnist.onnx"])
def test_shipped_models_convert_exactly(name):
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not built yet")
    model = onnx.load(str(path))
    x = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    _assert_exact(model, {"input": x})


@pytest.mark.slow
def test_ppocr_detector_converts_exactly():
    if not PPOCR.exists():
        pytest.skip("PP-OCRv4 det not cached (python tools/fetch_ppocr.py)")
    model = onnx.load(str(PPOCR))
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 224)).astype(np.float32)
    _assert_exact(model, {"x": x})


# ---- fake quantization vs onnxruntime ------------------------------------------------------------

def _calibrated(model, per_channel=False, n=128, reduce_range=False):
    net = to_torch(model)
    plan = prepare(net, FakeQuantConfig(per_channel=per_channel, reduce_range=reduce_range))
    x = _tiny_data(n, labels=False, hw=verify.input_specs(model)[0].shape[2])["input"]
    plan.set_mode(Mode.CALIBRATE)
    with torch.no_grad():
        net(torch.from_numpy(x))
    plan.set_mode(Mode.EVAL)
    return net, plan, {"input": x}


@pytest.mark.parametrize("per_channel", [False, True])
def test_export_computes_what_torch_fake_quant_computes(per_channel):
    """With 7-bit weights onnxruntime's integer kernels cannot saturate (see fake_quant), so
    the fused int8 model computes what the torch model computes, to the rounding."""
    model = _conv_bn_relu()
    net, plan, feeds = _calibrated(model, per_channel, reduce_range=True)
    qdq = export_qdq(model, plan)
    onnx.checker.check_model(qdq)
    ops = _ops(qdq)
    assert "BatchNormalization" not in ops and ops["QuantizeLinear"] == len(plan.activations)
    trained = _torch_out(net, feeds)
    plain = verify.compare_outputs(trained, verify.run(qdq, feeds))
    fused = verify.compare_outputs(trained, verify.run(verify.session(qdq, optimized=True),
                                                       feeds))
    assert plain.sqnr_db > 60, plain.summary()  # same math, float summation order aside
    assert fused.sqnr_db > 60, fused.summary()
    optimized = _optimized_ops(qdq)
    assert optimized["QLinearConv"] == 2 and "Conv" not in optimized


def test_eight_bit_weights_export_the_same_graph_math():
    """8-bit weights: the QDQ graph computes the fake-quant model; onnxruntime's fused u8s8
    kernels may saturate on CPUs without VNNI, so only the unfused graph is held to it."""
    model = _conv_bn_relu()
    net, plan, feeds = _calibrated(model, per_channel=True)
    qdq = export_qdq(model, plan)
    plain = verify.compare_outputs(_torch_out(net, feeds), verify.run(qdq, feeds))
    assert plain.sqnr_db > 60, plain.summary()
    assert int(np.abs(_initializers(qdq)[f"{plan.layers[0].layer.onnx_names['weight']}"
                                         "_quantized"]).max()) == 127


def test_quantization_points_follow_onnxruntime():
    """Inputs of Conv/Gemm and the Relu outputs after them; nothing between conv and relu, the
    graph output stays float."""
    model = _conv_bn_relu()
    net, plan, _ = _calibrated(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    kinds = sorted(producers[t].op_type if t in producers else "input"
                   for t in plan.activations)
    assert kinds == ["Flatten", "Relu", "Relu", "input"]
    assert any("graph output" in s.reason for s in plan.skips)
    relu_q = [q for t, q in plan.activations.items() if t in producers
              and producers[t].op_type == "Relu"]
    assert all(int(q.qparams()[1]) == 0 for q in relu_q)  # [0, max]: zero point 0


def test_weight_codes_are_symmetric_int8_and_dequantize_to_the_trained_weights():
    model = _conv_bn_relu()
    net, plan, _ = _calibrated(model, per_channel=True)
    qdq = export_qdq(model, plan)
    inits = _initializers(qdq)
    layer = plan.layers[0]
    w_name = layer.layer.onnx_names["weight"]
    codes, scale = inits[f"{w_name}_quantized"], inits[f"{w_name}_scale"]
    assert codes.dtype == np.int8 and codes.min() >= -127 and scale.shape == (8,)
    folded, _ = layer.folded()
    from onnxrep.training.fake_quant import fake_quant_weight

    expected = fake_quant_weight(folded.detach(), 0).numpy()
    np.testing.assert_array_equal(codes * scale[:, None, None, None], expected)


def test_conv_bn_trains_with_batch_statistics_and_evaluates_folded():
    model = _conv_bn_relu()
    net, plan, feeds = _calibrated(model)
    layer = next(q for q in plan.layers if q.bn is not None)
    x = torch.from_numpy(feeds["input"])
    layer.train()
    y = layer(x)
    dims = (0, 2, 3)
    assert torch.allclose(y.mean(dims), layer.bn.bias, atol=1e-4)  # normalized by the batch
    layer.eval()
    w, b = layer.folded()
    ref = layer.layer.apply(x, w, b)
    assert verify.metrics(ref.detach().numpy(), layer(x).detach().numpy()).sqnr_db > 30


# ---- training ------------------------------------------------------------------------------------

def test_two_step_qat_exports_a_valid_qdq_model_without_bn():
    model = _conv_bn_relu()
    result = qat_with_details(model, _tiny_data(), config=QATConfig(batch_size=32, max_steps=2,
                                                                   calib_samples=64))
    qdq = result.model
    onnx.checker.check_model(qdq)
    ops = _ops(qdq)
    assert "BatchNormalization" not in ops and ops["QuantizeLinear"] >= 3
    assert result.steps == 2 and len(result.history) == 2
    assert result.restored_bn == 2  # optimize folds the model's BN; one is restored per Conv
    assert result.conversion.rel <= RTOL
    assert result.deployment.sqnr_db > 30
    assert _optimized_ops(qdq)["QLinearConv"] == 2
    assert set(verify.input_specs(qdq)[0].shape[1:]) == {1, 12}


def test_training_is_deterministic_and_resume_continues_exactly(tmp_path):
    model = _conv_bn_relu()
    data = _tiny_data(160)
    config = QATConfig(epochs=2, batch_size=32, calib_samples=64, checkpoint_dir=tmp_path)
    full = qat(model, data, config=QATConfig(epochs=2, batch_size=32, calib_samples=64))
    again = qat(model, data, config=QATConfig(epochs=2, batch_size=32, calib_samples=64))
    stopped = qat_with_details(model, data, config=QATConfig(**{**vars(config),
                                                                "max_steps": 7}))
    assert stopped.steps == 7 and (tmp_path / "qat_checkpoint.pt").exists()
    resumed = qat_with_details(model, data, config=QATConfig(**{**vars(config), "resume": True}))
    assert resumed.resumed_from == 7 and resumed.steps == 10
    a, b, c = _initializers(full), _initializers(again), _initializers(resumed.model)
    assert a.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path):
    model = _conv_bn_relu()
    base = dict(batch_size=32, calib_samples=64, checkpoint_dir=tmp_path)
    qat(model, _tiny_data(64), config=QATConfig(**base, max_steps=1))
    with pytest.raises(Exception, match="another model"):
        qat(model, _tiny_data(64), config=QATConfig(**base, lr=0.5, resume=True))


def test_distillation_without_labels_and_dataloaders():
    model = _conv_bn_relu()
    x = torch.from_numpy(_tiny_data(128, labels=False)["input"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32,
                                         shuffle=True)
    loader = [b[0] for b in loader]  # batches of inputs only
    result = qat_with_details(model, loader, config=QATConfig(batch_size=32, calib_samples=64))
    assert all(h.accuracy is None for h in result.history)
    assert result.history[0].loss < 0.5  # KL to the FP32 model starts small
    y = torch.from_numpy(_tiny_data(128)["labels"])
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    mse = lambda out, target: torch.nn.functional.mse_loss(  # noqa: E731
        out, torch.nn.functional.one_hot(target, 4).float())
    result = qat_with_details(model, pairs, mse, QATConfig(calib_samples=64))
    assert result.steps == 4 and all(h.accuracy is not None for h in result.history)


def test_training_starts_from_the_ptq_model():
    """Held weights (a learning rate of 1e-12) and fixed ranges: the export is the PTQ model
    it started from, bias correction included, up to a rounding tie."""
    from onnxrep.ptq.quantizer import quantize

    model, data = _conv_bn_relu(), _tiny_data(128, labels=False)
    calib = {"input": data["input"][:64]}
    result = qat_with_details(model, data, calib=calib, config=QATConfig(
        batch_size=32, lr=1e-12, averaging_constant=0.0, keep_better=False))
    feeds = {"input": _tiny_data(64, seed=5, labels=False)["input"]}
    ptq = quantize(model, calib)
    assert result.ptq is not None and result.choice is None
    same = verify.compare_outputs(verify.run(ptq, feeds), verify.run(result.model, feeds))
    assert same.sqnr_db > 40, same.summary()
    mine, theirs = _activation_qparams(result.model), _activation_qparams(ptq)
    # every tensor PTQ quantizes (the pooling output too) but the graph output, kept float
    pooled = next(n.output[0] for n in model.graph.node if n.op_type == "GlobalAveragePool")
    assert mine.keys() == theirs.keys() - _quantized_outputs(ptq) and pooled in mine
    for tensor, (scale, zero) in mine.items():  # PTQ's ranges, not the corrected model's
        assert zero == theirs[tensor][1] and scale == pytest.approx(theirs[tensor][0], rel=1e-6)


def _quantized_outputs(qdq) -> set:
    """Tensors whose QuantizeLinear -> DequantizeLinear writes a graph output."""
    outputs = {o.name for o in qdq.graph.output}
    q_of = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    return {q_of[n.input[0]] for n in qdq.graph.node
            if n.op_type == "DequantizeLinear" and n.output[0] in outputs and n.input[0] in q_of}


def _activation_qparams(model) -> dict:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]].reshape(-1)[0]),
                         int(inits[n.input[2]].reshape(-1)[0]))
            for n in model.graph.node if n.op_type == "QuantizeLinear"
            and n.input[0] not in inits and inits[n.input[1]].size == 1}


def test_a_qat_run_that_ends_below_its_ptq_start_writes_the_ptq_model():
    model, data = _conv_bn_relu(), _tiny_data(128, labels=False)
    calib = {"input": data["input"][:64]}
    wreck = dict(batch_size=32, optimizer="adam", lr=0.5)  # each tensor moves 50% a step
    kept = qat_with_details(model, data, calib=calib, config=QATConfig(**wreck))
    assert kept.choice.kept == "ptq" and kept.choice.ptq_db > kept.choice.qat_db + 3
    assert kept.model.SerializeToString() == kept.ptq.SerializeToString()
    assert "wrote the PTQ model instead" in kept.choice.summary()
    raw = qat_with_details(model, data, calib=calib, config=QATConfig(**wreck,
                                                                      keep_better=False))
    assert raw.choice is None and raw.model.SerializeToString() != raw.ptq.SerializeToString()
    fine = qat_with_details(model, data, calib=calib, config=QATConfig(
        batch_size=32, lr=1e-12, averaging_constant=0.0))
    assert fine.choice.kept == "qat" and fine.choice.qat_db >= fine.choice.ptq_db


def test_adam_steps_are_relative_to_each_tensor():
    """An equivalent model whose first layer is 1000x smaller and whose second is 1000x larger
    trains along the same loss curve with the relative Adam steps."""
    def chain(c):
        m = Chain(channels=1, hw=(12, 12), seed=0).conv(8, stride=2).relu().conv(4, k=1).build()
        for init in m.graph.initializer:
            w = numpy_helper.to_array(init)
            first = init.name in (m.graph.node[0].input[1], m.graph.node[0].input[2])
            init.CopyFrom(numpy_helper.from_array((w * (c if first else 1 / c)
                                                   if init.name != m.graph.node[2].input[2]
                                                   else w).astype(np.float32), init.name))
        return m

    data = _tiny_data(128, labels=False)
    cfg = QATConfig(batch_size=32, optimizer="adam", lr=1e-2, optimize=False, from_ptq=False,
                    restore_bn=False, averaging_constant=0.0, rtol=1e-4)
    curves = [[h.loss for h in qat_with_details(chain(c), data, config=cfg).history]
              for c in (1.0, 1e-3)]
    assert len(curves[0]) == 4 and curves[0][-1] != curves[0][0]
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-3)


def test_bad_training_data_is_a_data_error():
    model = _conv_bn_relu()
    with pytest.raises(DataError, match="input"):
        qat(model, {"image": np.zeros((8, 1, 12, 12), np.float32)})
    with pytest.raises(DataError, match="classes"):
        bad = _tiny_data(64)
        bad["labels"] = bad["labels"] + 10
        qat(model, bad, config=QATConfig(batch_size=32, calib_samples=32))
    with pytest.raises(DataError, match="one-shot"):
        qat(model, iter([np.zeros((8, 1, 12, 12), np.float32)]))


def test_one_shot_iterator_trains_one_epoch_with_separate_calibration():
    model = _conv_bn_relu()
    data = _tiny_data(96)
    batches = ((data["input"][i:i + 32], data["labels"][i:i + 32]) for i in range(0, 96, 32))
    result = qat_with_details(model, batches, config=QATConfig(batch_size=32),
                              calib={"input": data["input"][:64]})
    assert result.steps == 3 and result.history[0].accuracy is not None


# ---- CLI -----------------------------------------------------------------------------------------

def _files(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(_conv_bn_relu(), str(model_path))
    np.savez(tmp_path / "train.npz", **_tiny_data(128))
    np.savez(tmp_path / "val.npz", **_tiny_data(64, seed=1))
    return model_path


def test_cli_writes_the_model_and_prints_accuracy(tmp_path, capsys):
    model_path = _files(tmp_path)
    before = model_path.read_bytes()
    out = tmp_path / "m.qat.onnx"
    rc = main(["qat", str(model_path), "--data", str(tmp_path / "train.npz"), "--val",
               str(tmp_path / "val.npz"), "--batch-size", "32", "--calib-samples", "64",
               "--json"])
    assert rc == 0 and out.exists() and model_path.read_bytes() == before
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.qat" and doc["steps"] == 4
    assert set(doc["evaluation"]) == {"FP32", "PTQ per-tensor", "QAT INT8"}
    assert "BatchNormalization" not in _ops(onnx.load(str(out)))
    assert main(["qat", str(model_path), "--data", str(tmp_path / "train.npz")]) == 2  # exists


def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path, capsys):
    model_path = _files(tmp_path)
    np.savez(tmp_path / "bad.npz", image=np.zeros((8, 1, 12, 12), np.float32))
    for argv in (["--data", str(tmp_path / "bad.npz")],
                 ["--data", str(tmp_path / "missing.npz")],
                 ["--data", str(tmp_path / "train.npz"), "--resume"]):
        assert main(["qat", str(model_path), *argv]) == 2
        assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # numeric options: checked at parse time
        main(["qat", str(model_path), "--data", str(tmp_path / "train.npz"), "--epochs", "0"])
    assert exc.value.code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "m.qat.onnx").exists()


def test_cli_defaults_are_the_config_defaults():
    from onnxrep.cli import build_parser

    args = build_parser().parse_args(["qat", "m.onnx", "--data", "d.npz"])
    config = QATConfig()
    for name in ("epochs", "optimizer", "lr", "batch_size", "momentum", "calib_samples", "seed",
                 "rtol", "from_ptq", "keep_better", "freeze_bn_after"):
        assert getattr(args, name) == getattr(config, name), name
    assert args.range_averaging == config.averaging_constant
    never = build_parser().parse_args(["qat", "m.onnx", "--data", "d.npz",
                                       "--freeze-bn-after", "never"])
    assert never.freeze_bn_after is None


def test_importing_onnxrep_and_its_cli_does_not_import_torch():
    code = ("import sys, onnxrep, onnxrep.cli, onnxrep.ptq.quantizer; onnxrep.cli.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- DistributedDataParallel --------------------------------------------------------------------

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, onnx
from test_qat import _conv_bn_relu, _tiny_data
from onnxrep.training.train import QATConfig, is_main_process, qat
model = qat(_conv_bn_relu(), _tiny_data(192), config=QATConfig(batch_size=32, calib_samples=64))
if is_main_process():
    onnx.save(model, sys.argv[1])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_what_one_does(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(driver), str(tmp_path / "one.onnx")], check=True,
                   env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(_free_port()), str(driver), str(tmp_path / "two.onnx")],
                   check=True, env=env)
    one, two = onnx.load(str(tmp_path / "one.onnx")), onnx.load(str(tmp_path / "two.onnx"))
    x = _tiny_data(256, seed=5, labels=False)
    cmp = verify.compare(one, two, x)
    assert cmp.rel < 1e-4, cmp.summary()  # measured: identical outputs
    codes = [k for k, v in _initializers(one).items() if v.dtype == np.int8]
    differing = sum(int(np.sum(_initializers(one)[k] != _initializers(two)[k])) for k in codes)
    total = sum(_initializers(one)[k].size for k in codes)
    assert differing <= 0.005 * total
