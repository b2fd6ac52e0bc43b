import hashlib
import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphs import Chain
from onnxrep import verify
from onnxrep.cli import main
from onnxrep.pipeline import OptimizeConfig, optimize_with_details
from onnxrep.passes.fold_affine import FoldAffine, FoldBatchNorm, fold_bn


def fout(name, rank=4):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def bn_params(rng, c, dtype=np.float32):
    return [rng.uniform(0.5, 2.0, c).astype(dtype), rng.normal(0, 0.5, c).astype(dtype),
            rng.normal(0, 0.5, c).astype(dtype), rng.uniform(0.1, 3.0, c).astype(dtype)]


def layer_bn(op="Conv", cin=4, cout=6, group=1, k=3, bias=True, opset=17, trans_b=1,
             beta=1.0, c_shape="vector", seed=0, training_mode=None, bn_dtype=np.float32,
             relu=True):
    """input -> op -> BatchNormalization [-> Relu]; Gemm layers read [N, cin]."""
    rng = np.random.default_rng(seed)
    inits, attrs = [], {}
    if op == "Conv":
        w = rng.normal(0, 0.5, (cout, cin // group, k, k))
        attrs = dict(kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
        x_shape = ["N", cin, 6, 6]
    elif op == "ConvTranspose":
        w = rng.normal(0, 0.5, (cin, cout // group, k, k))
        attrs = dict(kernel_shape=[k, k], strides=[2, 2], group=group)
        x_shape = ["N", cin, 5, 5]
    else:
        w = rng.normal(0, 0.5, (cout, cin) if trans_b else (cin, cout))
        attrs = dict(transB=trans_b, beta=beta)
        x_shape = ["N", cin]
    inits.append(numpy_helper.from_array(w.astype(np.float32), "W"))
    inputs = ["input", "W"]
    if bias:
        shape = {"vector": (cout,), "row": (1, cout), "scalar": (1,)}[c_shape]
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), "B"))
        inputs.append("B")
    names = ["gamma", "beta", "mean", "var"]
    inits += [numpy_helper.from_array(p, n) for p, n in zip(bn_params(rng, cout, bn_dtype), names)]
    bn_attrs = {"epsilon": 1e-3}
    if training_mode is not None:
        bn_attrs["training_mode"] = training_mode
    nodes = [helper.make_node(op, inputs, ["y"], name="layer", **attrs),
             helper.make_node("BatchNormalization", ["y", *names], ["z"], name="bn", **bn_attrs)]
    out = "z"
    if relu:
        nodes.append(helper.make_node("Relu", ["z"], ["out"], name="relu"))
        out = "out"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         x_shape)],
                              [fout(out, len(x_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def fold(model):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, FoldBatchNorm()(work)


def assert_same_function(a, b, rtol=1e-5, seed=0):
    feeds = verify.random_inputs(a, seed=seed)
    cmp = verify.compare(a, b, feeds)
    assert cmp.rel <= rtol, cmp.summary()


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("kw", [
    dict(), dict(bias=False), dict(group=2), dict(cin=6, cout=6, group=6), dict(k=1, opset=11),
    dict(opset=14, training_mode=0), dict(opset=15), dict(opset=21, training_mode=0),
    dict(op="ConvTranspose"), dict(op="ConvTranspose", group=2, bias=False),
    dict(op="Gemm"), dict(op="Gemm", trans_b=0, beta=0.5), dict(op="Gemm", bias=False),
    dict(op="Gemm", c_shape="row"), dict(op="Gemm", c_shape="scalar", beta=2.0),
])
def test_fold_is_equivalent_and_removes_the_bn(kw):
    model = layer_bn(**kw)
    onnx.checker.check_model(model)
    folded, result = fold(model)
    assert "BatchNormalization" not in ops(folded)
    assert result.summary.folded == 1 and not result.skips
    onnx.checker.check_model(folded)
    assert_same_function(model, folded)
    names = {t.name for t in folded.graph.initializer}
    assert not names & {"gamma", "beta", "mean", "var"}  # unused BN constants dropped


def test_fold_keeps_graph_output_name():
    model = layer_bn(relu=False)
    folded, _ = fold(model)
    assert folded.graph.node[-1].output[0] == "z" and folded.graph.output[0].name == "z"
    assert_same_function(model, folded)


def test_chained_bns_fold_in_turn():
    model = layer_bn(relu=False)
    rng = np.random.default_rng(3)
    names = ["g2", "b2", "m2", "v2"]
    model.graph.initializer.extend(numpy_helper.from_array(p, n)
                                   for p, n in zip(bn_params(rng, 6), names))
    model.graph.node.append(helper.make_node("BatchNormalization", ["z", *names], ["z2"]))
    model.graph.output[0].CopyFrom(fout("z2"))
    folded, result = fold(model)
    assert ops(folded) == ["Conv"] and result.summary.folded == 2
    assert_same_function(model, folded)


def test_skips_say_why():
    model = layer_bn()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["y2"], name="other"))
    model.graph.output.append(fout("y2"))
    folded, result = fold(model)
    assert "also read by 1 other node" in result.skips[0].reason
    assert "BatchNormalization" in ops(folded)

    model = layer_bn(opset=15, training_mode=1)
    _, result = fold(model)
    assert "training_mode=1" in result.skips[0].reason

    model = layer_bn()  # BN on a graph input
    model.graph.node[1].input[0] = "input"
    model.graph.node.remove(model.graph.node[0])
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                ["N", 6, 4, 4]))
    _, result = fold(model)
    assert "graph input" in result.skips[0].reason


def test_shared_weight_is_not_folded():
    model = layer_bn(relu=False)
    model.graph.node.append(helper.make_node("Conv", ["input", "W"], ["y3"], kernel_shape=[3, 3],
                                             pads=[1, 1, 1, 1]))
    model.graph.output.append(fout("y3"))
    _, result = fold(model)
    assert "shared by 2 nodes" in result.skips[0].reason


def test_second_run_changes_nothing_and_input_untouched():
    model = layer_bn()
    before = model.SerializeToString()
    folded, _ = fold(model)
    assert model.SerializeToString() == before
    again, result = fold(folded)
    assert not result.modified and again.SerializeToString() == folded.SerializeToString()


@settings(max_examples=30, deadline=None)
@given(cin=st.sampled_from([2, 4, 6]), mult=st.integers(1, 3), k=st.sampled_from([1, 3]),
       bias=st.booleans(), grouped=st.booleans(), op=st.sampled_from(["Conv", "ConvTranspose"]),
       seed=st.integers(0, 1000))
def test_fold_property(cin, mult, k, bias, grouped, op, seed):
    group = cin if grouped else 1
    model = layer_bn(op=op, cin=cin, cout=cin * mult, group=group, k=k, bias=bias, seed=seed)
    folded, result = fold(model)
    assert result.summary.folded == 1
    assert_same_function(model, folded, seed=seed)


def layer_affine(op, cout, group, bias, chain, rng):
    """input -> op -> the affine ops ``chain`` (bn, mul, add, sub, rsub = k - y, div, scalar)."""
    cin, inits, nodes = 4, [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    if op == "Gemm":
        w = rng.normal(0, 0.5, (cout, cin))
        attrs, x_shape, per_channel = dict(transB=1), [2, cin], (cout,)
    else:
        shape = (cin, cout // group) if op == "ConvTranspose" else (cout, cin // group)
        w = rng.normal(0, 0.5, shape + (3, 3))
        attrs, x_shape, per_channel = dict(group=group, pads=[1] * 4), [2, cin, 5, 5], (cout, 1, 1)
    inputs = ["input", const("W", w)] + ([const("B", rng.normal(0, 0.3, cout))] if bias else [])
    nodes.append(helper.make_node(op, inputs, ["t0"], name="layer", **attrs))
    for k, kind in enumerate(chain):
        x, y = f"t{k}", f"t{k + 1}"
        value = rng.uniform(0.5, 2.0, per_channel)
        if kind == "bn":
            names = [const(f"{p}{k}", v) for p, v in zip("gbmv", bn_params(rng, cout))]
            nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=f"n{k}",
                                          epsilon=1e-3))
        elif kind == "scalar":
            nodes.append(helper.make_node("Mul", [const(f"c{k}", [1.7]), x], [y], name=f"n{k}"))
        elif kind == "rsub":
            nodes.append(helper.make_node("Sub", [const(f"c{k}", value), x], [y], name=f"n{k}"))
        else:
            value = value.reshape(1, *value.shape) if kind == "add" else value  # [1, C, ...]
            nodes.append(helper.make_node(kind.capitalize(), [x, const(f"c{k}", value)], [y],
                                          name=f"n{k}"))
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, x_shape)], [fout(f"t{len(chain)}", len(x_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(["Conv", "ConvTranspose", "Gemm"]), cout=st.sampled_from([2, 4, 6]),
       group=st.sampled_from([1, 2]), bias=st.booleans(),
       chain=st.lists(st.sampled_from(["bn", "mul", "add", "sub", "rsub", "div", "scalar"]),
                      min_size=1, max_size=3),
       seed=st.integers(0, 10_000))
def test_fold_affine_is_equivalent(op, cout, group, bias, chain, seed):
    model = layer_affine(op, cout, group, bias, chain, np.random.default_rng(seed))
    onnx.checker.check_model(model)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    result = FoldAffine()(folded)
    assert result.summary.folded == len(chain) and not result.skips
    assert ops(folded) == [op]
    onnx.checker.check_model(folded)
    assert_same_function(model, folded, seed=seed)


def test_fold_bn_leaves_arithmetic_ops_to_fold_affine():
    model = layer_affine("Conv", 4, 1, True, ["mul", "bn"], np.random.default_rng(0))
    bn_only, result = fold(model)
    assert ops(bn_only) == ["Conv", "Mul", "BatchNormalization"]
    assert "its input comes from Mul 'n0'" in result.skips[0].reason
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert FoldAffine()(folded).summary.folded == 2 and ops(folded) == ["Conv"]


def test_fold_affine_leaves_a_fanned_out_conv_and_non_affine_ops():
    c = Chain(channels=3, seed=2).conv(4)
    conv_out = c.tensor
    c.node("Mul", [c.const(np.full((4, 1, 1), 2.0, np.float32))])
    mul_out = c.tensor
    c.nodes.append(helper.make_node("Add", [mul_out, conv_out], ["sum"], name="residual"))
    c.tensor = "sum"
    c.conv(4).node("Mul", [c.const(np.full((1, 1, 8, 8), 2.0, np.float32))])  # per pixel
    c.conv(4).node("Div", [c.const(np.array([1.0, 0.0, 2.0, 3.0], np.float32).reshape(4, 1, 1))])
    c.conv(4)
    c.nodes.append(helper.make_node("Div", [c.const(np.full((4, 1, 1), 2.0, np.float32)),
                                            c.tensor], ["out"], name="k_over_y"))
    c.tensor = "out"
    model = c.build()
    result = FoldAffine()(model)
    assert not result.modified and not result.skips  # arithmetic ops left are not reported


def test_optimize_folds_bn_and_mul_first_so_cle_can_pair():
    c = Chain(channels=3, hw=(8, 8)).conv(8, outliers={1: 50.0})
    model = c.build()
    rng = np.random.default_rng(0)
    names = ["g", "b", "m", "v"]
    model.graph.initializer.extend(numpy_helper.from_array(p, n)
                                   for p, n in zip(bn_params(rng, 8), names))
    y = model.graph.node[0].output[0]
    w2 = rng.normal(0, 0.5, (4, 8, 3, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w2, "W2"))
    model.graph.initializer.append(numpy_helper.from_array(
        rng.uniform(0.5, 2, (1, 8, 1, 1)).astype(np.float32), "k"))
    model.graph.node.extend([
        helper.make_node("BatchNormalization", [y, *names], ["bn"]),
        helper.make_node("Mul", ["bn", "k"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["out"], kernel_shape=[3, 3], pads=[1] * 4)])
    model.graph.output[0].CopyFrom(fout("out"))
    result = optimize_with_details(model, OptimizeConfig())
    passes = dict(result.results)
    assert passes["fold-affine"].summary.folded == 2
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Conv"]
    assert passes["equalize"].summary.pairs == 1 and passes["equalize"].changes
    assert result.comparison.rel < 1e-4
    no_fold = optimize_with_details(model, OptimizeConfig(fold_bn=False))
    assert dict(no_fold.results)["equalize"].summary.pairs == 0


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_fold_bn(tmp_path, capsys):
    src = tmp_path / "net.onnx"
    onnx.save(layer_bn(group=2), src)
    before = digest(src)
    assert main(["fold-bn", str(src)]) == 0
    out = capsys.readouterr().out
    assert "folded 1 BatchNormalization" in out and (tmp_path / "net.folded.onnx").exists()
    assert digest(src) == before
    folded = onnx.load(tmp_path / "net.folded.onnx")
    assert "BatchNormalization" not in ops(folded)
    assert main(["fold-bn", str(src)]) == 2  # exists without --force
    assert main(["fold-bn", str(src), "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.fold-bn" and doc["folded"][0]["into"] == "layer"
    assert main(["fold-bn", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_fold_bn_function_copies():
    model = layer_bn()
    before = model.SerializeToString()
    folded = fold_bn(model)
    assert model.SerializeToString() == before and "BatchNormalization" not in ops(folded)
