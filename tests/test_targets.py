"""Deployment targets (onnxrep.ptq.targets): the profiles, the TensorRT post-processing and one
test per TensorRT rule, on the shipped models and on tiny graphs for the patterns they lack
(residual Add, Concat). Each rule is checked twice: on the graph directly, and through
check_tensorrt_rules, which must also flag onnxruntime's default layout."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxrep.errors import InputError
from onnxrep.evaluation import evaluate
from onnxrep.ptq.quantizer import QuantizeConfig, quantize
from onnxrep.ptq.targets import (TARGETS, check_tensorrt_rules, depthwise_convs, get_target,
                                 residual_adds)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {name: ROOT / "models" / f"{name}_fmnist.onnx" for name in ("repvgg", "mobileone")}
CALIB = np.load(ROOT / "models" / "fmnist_calib.npz")["input"][:64]
EVAL = ROOT / "models" / "fmnist_eval.npz"


def quantized(model, target, **kw):
    config = QuantizeConfig(target=target, bias_correction=False, **kw)
    return quantize(model, {"input": CALIB_FOR(model)}, config)


def CALIB_FOR(model):  # noqa: N802
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if dims[1:] == [1, 28, 28]:
        return CALIB
    return np.random.default_rng(0).standard_normal((32, *dims[1:])).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(MODELS))
def shipped(request):
    """(name, FP32, TensorRT-profile QDQ, onnxruntime-profile QDQ) of a shipped model."""
    fp32 = onnx.load(str(MODELS[request.param]))
    return (request.param, fp32, quantized(fp32, "tensorrt"), quantized(fp32, "onnxruntime"))


def rules(problems, rule):
    return [p for p in problems if p.startswith(rule + ":")]


class G:
    """Producer / readers / constants of a graph, for the direct checks."""

    def __init__(self, model):
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers = {}
        for n in model.graph.node:
            for x in n.input:
                self.readers.setdefault(x, []).append(n)

    def op(self, tensor):
        n = self.producer.get(tensor)
        return n.op_type if n is not None else None


# ---- the profiles -----------------------------------------------------------------------------

def test_profiles_are_frozen_and_named():
    assert set(TARGETS) == {"onnxruntime", "openvino", "tensorrt"}
    trt = get_target("tensorrt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        trt.per_channel = False
    with pytest.raises(TypeError):
        trt.extra_options["QuantizeBias"] = True
    opts = trt.options()
    opts["QuantizeBias"] = True  # a copy
    assert trt.options()["QuantizeBias"] is False
    with pytest.raises(InputError, match="unknown target"):
        get_target("tflite")


def test_every_extra_option_is_one_onnxruntime_reads():
    """The keys are onnxruntime 1.32's own names: each appears in its quantizer's source."""
    src = Path(onnxruntime.__file__).parent / "quantization"
    text = "".join((src / f).read_text() for f in ("quantize.py", "qdq_quantizer.py",
                                                   "base_quantizer.py", "onnx_quantizer.py"))
    read = set(re.findall(r"extra_options\.get\(\s*\"(\w+)\"", text)) | set(
        re.findall(r"\"(\w+)\" in self\.extra_options", text))
    for target in TARGETS.values():
        kwargs = target.quantize_static_kwargs()
        assert set(kwargs) == {"quant_format", "op_types_to_quantize", "per_channel",
                               "activation_type", "weight_type", "extra_options"}
        unknown = set(kwargs["extra_options"]) - read
        assert not unknown, f"{target.name}: {unknown}"


def test_tensorrt_kwargs():
    from onnxruntime.quantization import QuantType

    kw = get_target("tensorrt").quantize_static_kwargs()
    assert kw["activation_type"] == QuantType.QInt8 and kw["weight_type"] == QuantType.QInt8
    assert kw["per_channel"] is True
    opts = kw["extra_options"]
    assert opts["ActivationSymmetric"] and opts["WeightSymmetric"] and not opts["QuantizeBias"]
    assert opts["QDQOpTypePerChannelSupportToAxis"] == {"Conv": 0, "ConvTranspose": 1}
    assert {"Conv", "Gemm", "MatMul", "Add"} <= set(opts["OpTypesToExcludeOutputQuantization"])
    assert get_target("tensorrt").quantize_static_kwargs(per_channel=False)["per_channel"] is False


# ---- TensorRT rules on the shipped models ------------------------------------------------------

def test_shipped_tensorrt_model_is_compliant_and_onnxruntime_layout_is_not(shipped):
    name, _, trt, ort = shipped
    assert check_tensorrt_rules(trt) == []
    flagged = {p.split(":")[0] for p in check_tensorrt_rules(ort)}
    assert {"zero-point", "int8", "per-channel", "float-bias", "input-placement"} <= flagged


def test_rule_zero_points_are_zero(shipped):
    _, _, trt, ort = shipped
    g = G(trt)
    zps = [g.inits[n.input[2]] for n in trt.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zps and all(np.all(z == 0) for z in zps)
    assert rules(check_tensorrt_rules(ort), "zero-point")


def test_rule_activations_and_weights_are_int8(shipped):
    _, _, trt, ort = shipped
    g = G(trt)
    for n in trt.graph.node:
        if n.op_type == "QuantizeLinear":
            assert g.inits[n.input[2]].dtype == np.int8
        if n.op_type == "DequantizeLinear" and n.input[0] in g.inits:
            assert g.inits[n.input[0]].dtype == np.int8  # weights; biases stay float
    assert rules(check_tensorrt_rules(ort), "int8")


def test_rule_weights_per_channel_on_output_axis(shipped):
    _, fp32, trt, ort = shipped
    g = G(trt)
    convs = [n for n in trt.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == sum(n.op_type in ("Conv", "Gemm") for n in fp32.graph.node)
    for n in convs:
        dq = g.producer[n.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = g.inits[dq.input[0]], g.inits[dq.input[1]]
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        assert axis == 0 and scale.shape == (w.shape[0],)
    assert rules(check_tensorrt_rules(ort), "per-channel")


def test_rule_biases_stay_float(shipped):
    _, _, trt, ort = shipped
    g = G(trt)
    for n in trt.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
            assert n.input[2] in g.inits and g.inits[n.input[2]].dtype == np.float32
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in g.inits
                   and g.inits[n.input[0]].dtype == np.int32 for n in trt.graph.node)
    assert rules(check_tensorrt_rules(ort), "float-bias")


def test_rule_qdq_on_layer_inputs_not_outputs(shipped):
    _, _, trt, ort = shipped
    g = G(trt)
    for n in trt.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            assert g.op(n.input[0]) == "DequantizeLinear"
            assert not any(r.op_type == "QuantizeLinear" for r in g.readers.get(n.output[0], []))
        if n.op_type == "QuantizeLinear":
            assert g.op(n.input[0]) not in ("Conv", "Gemm", "MatMul")
    assert rules(check_tensorrt_rules(ort), "input-placement")


def test_rule_nothing_between_conv_and_relu(shipped):
    _, fp32, trt, _ = shipped
    g = G(trt)
    relus = [n for n in trt.graph.node if n.op_type == "Relu"]
    assert len(relus) == sum(n.op_type == "Relu" for n in fp32.graph.node)
    assert all(g.op(r.input[0]) == "Conv" for r in relus)
    # put a Q/DQ pair between the first Conv and its Relu: the check names it
    broken = onnx.ModelProto()
    broken.CopyFrom(trt)
    relu = next(n for n in broken.graph.node if n.op_type == "Relu")
    x = relu.input[0]
    broken.graph.initializer.extend([numpy_helper.from_array(np.float32(0.1), "s"),
                                     numpy_helper.from_array(np.int8(0), "z")])
    broken.graph.node.extend([helper.make_node("QuantizeLinear", [x, "s", "z"], ["xq"], "q"),
                              helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"],
                                               "dq")])
    relu.input[0] = "xd"
    found = check_tensorrt_rules(broken)
    assert rules(found, "conv-bn-relu") and rules(found, "input-placement")


def test_shipped_models_have_no_residual_add_or_concat(shipped):
    _, fp32, trt, _ = shipped
    assert residual_adds(fp32) == [] and residual_adds(trt) == []
    assert not any(n.op_type == "Concat" for n in trt.graph.node)


def test_tensorrt_accuracy_close_to_onnxruntime_profile(shipped):
    """Sanity on the 2000 shipped test images (the 0.2 pp comparison on 10k images is
    tools/bench_targets.py's): both profiles within 1.5 pp of each other."""
    _, _, trt, ort = shipped
    a, b = evaluate(trt, str(EVAL)).top1, evaluate(ort, str(EVAL)).top1
    assert abs(a - b) <= 0.015


# ---- residual Add and Concat on tiny graphs ---------------------------------------------------

def _conv(name, x, cin, cout, rng, k=3):
    w = numpy_helper.from_array(rng.normal(0, 0.4, (cout, cin, k, k)).astype(np.float32),
                                f"{name}.w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{name}.b")
    node = helper.make_node("Conv", [x, w.name, b.name], [f"{name}.y"], name,
                            kernel_shape=[k, k], pads=[k // 2] * 4)
    return node, [w, b], f"{name}.y"


def _model(nodes, inits, out, c=4, hw=8):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, hw, hw])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def residual_block():
    """stem Conv -> Relu (r); Conv(r) -> Relu -> Conv -> Add(., r) -> Relu -> Conv: a ResNet
    basic block (two convs in the branch, so it is no Rep block to merge)."""
    rng = np.random.default_rng(0)
    n1, i1, y1 = _conv("stem", "input", 1, 4, rng)
    n0, i0, y0 = _conv("inner", "r", 4, 4, rng)
    n2, i2, y2 = _conv("branch", "q", 4, 4, rng)
    n3, i3, y3 = _conv("head", "s", 4, 2, rng)
    nodes = [n1, helper.make_node("Relu", [y1], ["r"], "relu1"), n0,
             helper.make_node("Relu", [y0], ["q"], "relu0"), n2,
             helper.make_node("Add", [y2, "r"], ["a"], "add"),
             helper.make_node("Relu", ["a"], ["s"], "relu2"), n3]
    return _model(nodes, i1 + i0 + i2 + i3, y3)


def dense_block():
    """stem Conv -> Relu (r); Conv(r) -> Relu (c); Concat(r, c) -> Conv: DenseNet-style, so the
    Concat's first input is quantized (it feeds a Conv) and its output too."""
    rng = np.random.default_rng(1)
    n1, i1, y1 = _conv("stem", "input", 1, 4, rng)
    n2, i2, y2 = _conv("grow", "r", 4, 4, rng)
    n3, i3, y3 = _conv("head", "cat", 8, 2, rng)
    nodes = [n1, helper.make_node("Relu", [y1], ["r"], "relu1"), n2,
             helper.make_node("Relu", [y2], ["c"], "relu2"),
             helper.make_node("Concat", ["r", "c"], ["cat"], "concat", axis=1), n3]
    return _model(nodes, i1 + i2 + i3, y3)


def hardswish_residual_block():
    """stem Conv -> Relu (r); Conv(r) -> HardSwish written out as x * clip(x + 3, 0, 6) / 6
    (as paddle2onnx exports PP-LCNet) -> Conv -> Add(., r) -> Relu -> Conv."""
    rng = np.random.default_rng(3)
    n1, i1, y1 = _conv("stem", "input", 1, 4, rng)
    n2, i2, y2 = _conv("act", "r", 4, 4, rng)
    n3, i3, y3 = _conv("branch", "hs", 4, 4, rng)
    n4, i4, y4 = _conv("head", "s", 4, 2, rng)
    consts = [numpy_helper.from_array(np.float32(v), name)
              for v, name in ((3, "three"), (0, "zero"), (6, "six"))]
    nodes = [n1, helper.make_node("Relu", [y1], ["r"], "relu1"), n2,
             helper.make_node("Add", [y2, "three"], ["p3"], "hs_add3"),
             helper.make_node("Clip", ["p3", "zero", "six"], ["c6"], "hs_clip"),
             helper.make_node("Mul", [y2, "c6"], ["m"], "hs_mul"),
             helper.make_node("Div", ["m", "six"], ["hs"], "hs_div"), n3,
             helper.make_node("Add", [y3, "r"], ["a"], "add"),
             helper.make_node("Relu", ["a"], ["s"], "relu2"), n4]
    return _model(nodes, i1 + i2 + i3 + i4 + consts, y4)


@pytest.mark.parametrize("per_channel", [True, False])
def test_hardswish_stays_float_and_residual_add_keeps_its_skip_qdq(per_channel):
    """The scalar Add of a written-out HardSwish is no residual Add: it and the Clip/Mul/Div
    after it read the Conv's float output (TensorRT fuses the activation into the Conv),
    while the residual Add reads its conv branch in float and its skip input through Q/DQ."""
    fp32 = hardswish_residual_block()
    trt = quantized(fp32, "tensorrt", per_channel=per_channel)
    assert check_tensorrt_rules(trt, per_channel=per_channel) == []
    g = G(trt)
    hardswish = [n for n in trt.graph.node if n.name in ("hs_add3", "hs_clip", "hs_mul",
                                                           "hs_div")]
    assert [n.op_type for n in hardswish] == ["Add", "Clip", "Mul", "Div"]
    for n in hardswish:
        assert not any(g.op(x) == "DequantizeLinear" for x in n.input), n.name
    assert not any(r.op_type == "QuantizeLinear" for r in g.readers["act.y"])
    assert g.op(g.producer["branch.y"].input[0]) == "DequantizeLinear"  # next conv's input
    add = next(n for n in trt.graph.node if n.name == "add")
    assert g.op(add.input[0]) == "Conv" and g.op(add.input[1]) == "DequantizeLinear"
    # onnxruntime's Q/DQ on every Add quantizes the Conv output the HardSwish reads
    every_add = dataclasses.replace(get_target("tensorrt"), float_nodes=None, postprocess=None,
                                    check=None)
    found = check_tensorrt_rules(quantized(fp32, every_add, per_channel=per_channel),
                                 per_channel=per_channel)
    assert any("into Add hs_add3" in p for p in rules(found, "input-placement"))
    from onnxrep.verify import run

    x = {"input": CALIB_FOR(fp32)}
    ref, out = run(fp32, x)["head.y"], run(trt, x)["head.y"]
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()


def test_tensorrt_per_tensor_weights_pass_when_asked(shipped):
    _, fp32, _, _ = shipped
    trt = quantized(fp32, "tensorrt", per_channel=False)
    assert check_tensorrt_rules(trt, per_channel=False) == []
    assert rules(check_tensorrt_rules(trt), "per-channel")  # not per-channel, as asked


def test_residual_add_detection():
    ((add, k),) = residual_adds(residual_block())
    assert add.name == "add" and add.input[k] == "branch.y"
    # Conv -> Relu -> Add(., conv output): the Add reads the Conv's own output on both sides
    rng = np.random.default_rng(2)
    n1, i1, y1 = _conv("c", "input", 1, 4, rng)
    convnext = _model([n1, helper.make_node("Relu", [y1], ["r"], "relu"),
                       helper.make_node("Add", ["r", y1], ["a"], "add")], i1, "a")
    assert residual_adds(convnext) == []


def test_rule_residual_add_skip_input_quantized_conv_branch_not():
    fp32 = residual_block()
    trt = quantized(fp32, "tensorrt")
    g = G(trt)
    add = next(n for n in trt.graph.node if n.op_type == "Add")
    assert g.op(add.input[0]) == "Conv"  # conv branch read directly: Conv+Add fuses
    assert g.op(add.input[1]) == "DequantizeLinear"  # skip input int8
    assert g.op(g.producer[add.input[1]].input[0]) == "QuantizeLinear"
    assert check_tensorrt_rules(trt) == []
    raw = quantized(fp32, dataclasses.replace(get_target("tensorrt"), postprocess=None, check=None))
    assert rules(check_tensorrt_rules(raw), "residual-add")
    # equivalent up to quantization: close to FP32 on the calibration data
    x = {"input": CALIB_FOR(fp32)}
    from onnxrep.verify import run

    ref, out = run(fp32, x)["head.y"], run(trt, x)["head.y"]
    assert np.abs(ref - out).max() < 0.1 * np.abs(ref).max()


def test_rule_concat_inputs_share_one_scale():
    fp32 = dense_block()
    trt = quantized(fp32, "tensorrt")
    g = G(trt)
    concat = next(n for n in trt.graph.node if n.op_type == "Concat")
    scales = {float(g.inits[g.producer[x].input[1]]) for x in concat.input
              if g.op(x) == "DequantizeLinear"}
    scales |= {float(g.inits[r.input[1]]) for r in g.readers[concat.output[0]]
               if r.op_type == "QuantizeLinear"}
    assert len(scales) == 1
    assert check_tensorrt_rules(trt) == []
    raw = quantized(fp32, dataclasses.replace(get_target("tensorrt"), postprocess=None, check=None))
    assert rules(check_tensorrt_rules(raw), "concat-scale")


# ---- openvino profile --------------------------------------------------------------------------

def test_openvino_profile_per_channel_and_depthwise_option():
    """The openvino profile quantizes every conv (depthwise too: in int8 it was no slower in
    OpenVINO, and in float it added reorders) with per-channel weights; ``float_depthwise``
    keeps exactly the depthwise convs in float."""
    fp32 = onnx.load(str(MODELS["mobileone"]))
    dw = set(depthwise_convs(fp32))
    assert len(dw) == 6 and len(depthwise_convs(onnx.load(str(MODELS["repvgg"])))) == 0
    target = get_target("openvino")
    assert target.per_channel and not target.float_depthwise
    for profile, float_dw in ((target, False),
                              (dataclasses.replace(target, float_depthwise=True), True)):
        q = quantized(fp32, profile)
        g = G(q)
        for n in q.graph.node:
            if n.op_type != "Conv":
                continue
            if float_dw and n.name in dw:
                assert g.op(n.input[1]) is None and n.input[1] in g.inits  # float weight
            else:
                dq = g.producer[n.input[1]]
                assert dq.op_type == "DequantizeLinear" and g.inits[dq.input[1]].ndim == 1


def test_cli_tensorrt_target_with_bias_correction(tmp_path, capsys):
    """The default flow (bias correction on) for TensorRT: corrected on int32 biases, written
    with float biases, every rule holding, nodes counted as quantized."""
    from onnxrep.cli import main

    out = tmp_path / "trt.onnx"
    assert main(["quantize", str(MODELS["repvgg"]), "--calib", str(ROOT / "models" /
                 "fmnist_calib.npz"), "--target", "tensorrt", "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "for tensorrt: per-channel" in printed and " 0 nodes quantized" not in printed
    assert "bias correction on" in printed
    assert check_tensorrt_rules(onnx.load(out)) == []


# ---- QAT export per target ---------------------------------------------------------------------

def _layout(model):
    """{node name: (op type, indices of its activation inputs read through Q/DQ, whether an
    output is quantized)} for every non-Q/DQ node."""
    from onnxrep.ir.graph import GraphIndex
    from onnxrep.ptq.targets import dq_source

    g = GraphIndex(model.graph)
    out = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = tuple(i for i, x in enumerate(n.input)
                    if dq_source(g, x) is not None and not g.is_const(dq_source(g, x)[0].input[0]))
        quantized_out = any(r.op_type == "QuantizeLinear" for o in n.output
                            for r in g.reader_nodes(o))
        out[n.name] = (n.op_type, ins, quantized_out)
    return out


def _qat(model, target, data=None, **kw):
    """The QAT export itself (keep_better off: never the PTQ model it started from)."""
    pytest.importorskip("torch")
    from onnxrep.training.train import QATConfig, qat

    data = data if data is not None else {"input": CALIB_FOR(model)}
    return qat(model, data, config=QATConfig(target=target, max_steps=2, batch_size=32,
                                             calib_samples=32, keep_better=False, **kw))


def test_qat_tensorrt_export_places_qdq_as_quantize_does(tmp_path, capsys):
    """`onnxrep qat --target tensorrt` on the shipped MobileOne: every TensorRT rule holds, and
    the Q/DQ layout (which inputs of which node are quantized, which outputs) is exactly the
    one `onnxrep quantize --target tensorrt` writes."""
    pytest.importorskip("torch")
    from onnxrep.cli import main

    out = tmp_path / "m.trt.onnx"
    assert main(["qat", str(MODELS["mobileone"]), "--data", str(ROOT / "models" /
                 "fmnist_calib.npz"), "--target", "tensorrt", "--max-steps", "2",
                 "--batch-size", "32", "--calib-samples", "32", "-o", str(out), "-q"]) == 0
    exported = onnx.load(out)
    assert check_tensorrt_rules(exported) == []
    ptq = quantized(onnx.load(str(MODELS["mobileone"])), "tensorrt")
    assert _layout(exported) == _layout(ptq)


def test_qat_tensorrt_residual_add_and_concat():
    """Input placement on the patterns the shipped models lack: the residual Add reads its conv
    branch unquantized and its skip input through Q/DQ, a Concat's inputs and output share one
    scale; both trained that way (the rules hold without post-processing)."""
    for fp32 in (residual_block(), dense_block()):
        out = fp32.graph.output[0]  # the QAT export's checker wants the output's shape
        out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["N", 2, 8, 8]))
        # a PTQ start would quantize with this target too, and need the post-processing
        trt = _qat(fp32, dataclasses.replace(get_target("tensorrt"), postprocess=None),
                   from_ptq=False)
        assert check_tensorrt_rules(trt) == []
        assert _layout(trt) == _layout(quantized(fp32, "tensorrt"))


def test_qat_openvino_export_runs_in_openvino():
    """The openvino target's QAT export: per-channel weights by default, and OpenVINO runs it
    with the same top-1 as onnxruntime."""
    pytest.importorskip("openvino")
    from onnxrep.runtime import session

    fp32 = onnx.load(str(MODELS["repvgg"]))
    q = _qat(fp32, "openvino")
    g = G(q)
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert convs and all(g.inits[g.producer[n.input[1]].input[1]].ndim == 1 for n in convs)
    x = {"input": CALIB[:32]}
    ov, ort_out = session(q, "openvino").run(x)[0], session(q).run(x)[0]
    assert np.mean(ov.argmax(1) == ort_out.argmax(1)) >= 0.95
    assert np.abs(ov - ort_out).max() < 0.1 * np.abs(ort_out).max()


def test_qat_unknown_target_is_a_usage_error(capsys):
    from onnxrep.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["qat", str(MODELS["repvgg"]), "--data", "d.npz", "--target", "tflite"])
    assert exc.value.code == 2 and "tflite" in capsys.readouterr().err


# ---- no pass breaks fusion ---------------------------------------------------------------------

ACTIVATIONS = ("Relu", "Clip")


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_optimized_int8_model_keeps_conv_activation_fusable(name, target):
    """`optimize` then `quantize`, on the shipped model with a BatchNormalization restored after
    every Conv (what a QAT-ready or train-form export carries): no BatchNormalization is left,
    and every Conv that the FP32 model followed with an activation is read only by that
    activation or by the QuantizeLinear that replaced it (onnxruntime folds the ReLU into the
    output's range), so no float op sits where the runtime fuses Conv+activation."""
    from onnxrep.pipeline import optimize, restore_bn

    fp32 = onnx.load(str(MODELS[name]))
    with_bn = restore_bn(fp32, {"input": CALIB})
    assert sum(n.op_type == "BatchNormalization" for n in with_bn.graph.node) >= 7
    q = quantized(optimize(with_bn, calib={"input": CALIB}), target)
    assert not [n.name for n in q.graph.node if n.op_type == "BatchNormalization"]
    g = G(fp32)
    activated = {n.name for n in fp32.graph.node if n.op_type == "Conv"
                 and [r.op_type for r in g.readers.get(n.output[0], [])] in (["Relu"], ["Clip"])}
    gq = G(q)
    convs = {n.name: n for n in q.graph.node if n.op_type == "Conv"}
    assert activated and activated <= set(convs)
    for conv in activated:
        readers = {r.op_type for r in gq.readers.get(convs[conv].output[0], [])}
        assert readers and readers <= {*ACTIVATIONS, "QuantizeLinear"}, (conv, readers)
