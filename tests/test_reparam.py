"""Reparameterize: train-form Rep blocks merged into one Conv, checked on real torch exports
(the shipped models' RepVGG and MobileOne definitions, ACNet, QARepVGG, RepViT's RepDW, DBB,
PP-LCNetV3's LearnableRepLayer), helper-built refusals and a property test."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxrep import find_blocks, reparameterize, verify
from onnxrep.cli import main
from onnxrep.errors import VerificationError
from onnxrep.passes.reparameterize import Reparameterize

torch = pytest.importorskip("torch")
import train_forms as tf  # noqa: E402  (needs torch)


def run_pass(model):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    result = Reparameterize()(work)
    onnx.checker.check_model(work)
    return work, result


def ops(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def const(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


def rel_error(model_a, model_b, x):
    a = verify.run(model_a, {"input": x})
    b = verify.run(model_b, {"input": x})
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


# ---- the shipped models' train forms against their own reparameterize() -------------------------

@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn-folded", "bn-kept"])
@pytest.mark.parametrize("arch", ["repvgg", "mobileone"])
def test_shipped_architectures_match_their_own_deploy_form(arch, keep_bn, tmp_path):
    from models.mobileone import mobileone_fmnist
    from models.repvgg import repvgg_fmnist

    net = tf.randomize({"repvgg": repvgg_fmnist, "mobileone": mobileone_fmnist}[arch](), seed=3)
    train = tf.export(net, (1, 1, 28, 28), tmp_path / "train.onnx", keep_bn=keep_bn)
    assert ops(train, "BatchNormalization")  # identity branches at least
    deploy_net = copy.deepcopy(net).reparameterize()
    deploy = tf.export(deploy_net, (1, 1, 28, 28), tmp_path / "deploy.onnx")

    merged, result = run_pass(train)
    assert not result.skips
    assert not ops(merged, "BatchNormalization") and not ops(merged, "Add")
    ours, theirs = ops(merged, "Conv"), ops(deploy, "Conv")
    assert len(ours) == len(theirs) == result.summary.merged
    for a, b in zip(ours, theirs):
        for slot in (1, 2):
            wa, wb = const(merged, a.input[slot]), const(deploy, b.input[slot])
            assert wa.shape == wb.shape and wa.dtype == np.float32
            np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-5 * np.abs(wb).max())
        assert {x.name: helper.get_attribute_value(x) for x in a.attribute if x.name != "dilations"
                } == {x.name: helper.get_attribute_value(x) for x in b.attribute
                      if x.name != "dilations"}
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    assert rel_error(train, merged, x) <= 1e-5
    assert rel_error(deploy, merged, x) <= 1e-5
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    out = verify.run(merged, {"input": x})["output"]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


# ---- other families, as torch modules -----------------------------------------------------------

FAMILIES = {
    "acnet": (lambda: tf.stack(tf.ACBlock(4, 8), tf.ACBlock(8, 8, 2)), (1, 4, 9, 9), 2),
    "qarepvgg": (lambda: tf.stack(tf.QARepVGGBlock(6), tf.QARepVGGBlock(6)), (1, 6, 8, 8), 2),
    "repvit-repdw": (lambda: tf.stack(tf.RepDW(8), tf.RepDW(8, bn1=False)), (1, 8, 8, 8), 2),
    "dbb": (lambda: tf.stack(tf.DBB(4, 8), tf.DBB(8, 8, 3, 2, groups=2), tf.DBB(8, 8, 5)),
            (1, 4, 12, 12), 3),
    "dbb-depthwise-avg": (lambda: tf.DepthwiseAvgDBB(6), (1, 6, 8, 8), 1),
    "learnable-rep-layer": (lambda: tf.stack(
        tf.LearnableRepLayer(8, 8, 3), tf.LearnableRepLayer(8, 16, 5, 2, num_conv_branches=3)),
        (1, 8, 10, 10), 2),
}


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn-folded", "bn-kept"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merges_into_one_conv_per_block(family, keep_bn, tmp_path):
    build, shape, blocks = FAMILIES[family]
    net = tf.randomize(build(), seed=7)
    train = tf.export(net, shape, tmp_path / "train.onnx", keep_bn=keep_bn)
    merged, result = run_pass(train)
    assert not result.skips, result.skips
    assert result.summary.merged == blocks == len(ops(merged, "Conv"))
    assert not ops(merged, "BatchNormalization") and not ops(merged, "AveragePool")
    assert not ops(merged, "Pad")
    x = np.random.default_rng(1).standard_normal((4,) + shape[1:]).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    out = verify.run(merged, {"input": x})["output"]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    assert rel_error(train, merged, x) <= 1e-5
    again, second = run_pass(merged)
    assert not second.changes and again.SerializeToString() == merged.SerializeToString()


def test_learnable_affine_after_the_sum_is_folded(tmp_path):
    net = tf.randomize(tf.LearnableRepLayer(4, 4, 3), seed=2)
    merged, result = run_pass(tf.export(net, (1, 4, 6, 6), tmp_path / "m.onnx"))
    (block,) = result.summary.blocks
    assert block.after == ["Mul", "Add"]
    assert block.branches == "2x 3x3 + 1x1 + BN"
    # the Mul/Add left are the activation's affine, after HardSwish
    assert [n.op_type for n in merged.graph.node] == ["Conv", "HardSwish", "Mul", "Add"]


# ---- helper-built blocks ------------------------------------------------------------------------

class Block:
    """``input`` -> branches -> Add chain (or one Sum) [-> post ops]; seeded weights."""

    def __init__(self, cin=4, hw=(8, 8), seed=0, dtype=np.float32, opset=17):
        self.rng = np.random.default_rng(seed)
        self.cin, self.hw, self.dtype, self.opset = cin, hw, dtype, opset
        self.nodes, self.inits, self.leaves, self.outputs = [], [], [], []
        self.extra_inputs = []
        self.n = 0
        self.x = "input"

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def const(self, value, p="c", as_node=False):
        name = self.name(p)
        value = np.asarray(value).astype(self.dtype) if np.asarray(value).dtype.kind == "f" \
            else np.asarray(value)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name],
                                               value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def bn_params(self, c):
        r = self.rng
        return [self.const(v) for v in (r.uniform(0.3, 2.0, c) * r.choice([-1, 1], c),
                                        r.normal(0, 0.5, c), r.normal(0, 0.5, c),
                                        r.uniform(0.05, 3.0, c))]

    def bn(self, t, c, name=None):
        out = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [t, *self.bn_params(c)], [out],
                                           name=name or out, epsilon=1e-3))
        return out

    def conv(self, t, cin, cout, k=(3, 3), stride=1, group=1, pads=None, dil=1, bias=True,
             name=None, weight=None, as_node=False):
        k = tuple(k)
        pads = [(s // 2) * dil for s in k] * 2 if pads is None else list(pads)
        w = weight or self.const(self.rng.normal(0, 0.5, (cout, cin // group) + k), "W",
                                 as_node=as_node)
        inputs = [t, w] + ([self.const(self.rng.normal(0, 0.3, cout), "B", as_node=as_node)]
                           if bias else [])
        out = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", inputs, [out], name=name or out, kernel_shape=list(k), pads=pads,
            strides=[stride] * len(k), dilations=[dil] * len(k), group=group))
        return out

    def branch(self, cout, k=(3, 3), bn=True, **kw):
        t = self.conv(self.x, self.cin, cout, k, **kw)
        t = self.bn(t, cout) if bn else t
        self.leaves.append(t)
        return t

    def identity(self, bn=True):
        self.leaves.append(self.bn(self.x, self.cin) if bn else self.x)

    def op(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def build(self, post=(), use_sum=False, out_channels=None):
        if use_sum:
            t = self.op("Sum", list(self.leaves))
        else:
            t = self.leaves[0]
            for leaf in self.leaves[1:]:
                t = self.op("Add", [t, leaf])
        self.root = self.nodes[-1].name
        c = out_channels or self.cin
        for p in post:
            if p == "bn":
                t = self.bn(t, c)
            elif p == "mul":
                t = self.op("Mul", [t, self.const(self.rng.uniform(0.5, 2, (1, c, 1, 1)))])
            elif p == "scalar":
                t = self.op("Mul", [self.const(np.array([1.7])), t])
                t = self.op("Add", [t, self.const(np.array([-0.3]))])
            elif p == "sub-div":
                t = self.op("Sub", [t, self.const(self.rng.normal(0, 1, (c, 1, 1)))])
                t = self.op("Div", [t, self.const(np.array(0.8))])
            elif p == "relu":
                t = self.op("Relu", [t])
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        graph = helper.make_graph(
            self.nodes, "block",
            [helper.make_tensor_value_info("input", elem, ["N", self.cin, *self.hw])]
            + self.extra_inputs,
            [helper.make_tensor_value_info(t, elem, [None] * 4)]
            + [helper.make_tensor_value_info(o, elem, [None] * 4) for o in self.outputs],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def assert_equivalent(a, b, rtol=1e-5):
    cmp = verify.compare(a, b, verify.random_inputs(a, seed=1))
    assert cmp.rel <= rtol, cmp.summary()


@pytest.mark.parametrize("post", [(), ("bn",), ("mul",), ("scalar",), ("sub-div", "relu")])
def test_post_sum_affine_folds(post):
    b = Block()
    b.branch(4)
    b.branch(4, (1, 1))
    b.identity(bn=False)
    model = b.build(post=post, use_sum=True)
    merged, result = run_pass(model)
    assert len(ops(merged, "Conv")) == 1 and result.summary.merged == 1
    assert len(merged.graph.node) == 1 + ("relu" in post)
    assert_equivalent(model, merged)


def test_constant_node_weights_and_dead_constants_removed():
    b = Block()
    b.branch(4, as_node=True)
    b.branch(4, (1, 1), as_node=True)
    b.identity()
    model = b.build()
    merged, _ = run_pass(model)
    assert [n.op_type for n in merged.graph.node] == ["Conv"]
    assert len(merged.graph.initializer) == 2  # the merged weight and bias only
    assert_equivalent(model, merged)


def test_shared_initializer_is_not_modified():
    """A branch weight also read by a Conv outside the block stays as it was."""
    b = Block()
    shared = b.const(b.rng.normal(0, 0.5, (4, 4, 3, 3)), "Wshared")
    b.branch(4, weight=shared)
    b.branch(4, (1, 1))
    b.identity()
    t = b.op("Add", [b.leaves[0], b.leaves[1]])
    t = b.op("Add", [t, b.leaves[2]])
    b.leaves = [b.conv(t, 4, 4, weight=shared, bias=False)]
    model = b.build()
    before = numpy_helper.to_array(model.graph.initializer[0]).copy()
    merged, result = run_pass(model)
    assert result.summary.merged == 1
    kept = [x for x in merged.graph.initializer if x.name == shared]
    assert kept and np.array_equal(numpy_helper.to_array(kept[0]), before)
    assert_equivalent(model, merged)


def test_reparameterize_does_not_mutate_and_is_idempotent():
    b = Block()
    b.branch(4)
    b.branch(4, (1, 1))
    b.identity()
    model = b.build(post=("relu",))
    data = model.SerializeToString()
    out = reparameterize(model, rtol=1e-5)
    assert model.SerializeToString() == data
    assert len(ops(out, "Conv")) == 1
    assert reparameterize(out).SerializeToString() == out.SerializeToString()


def test_find_blocks_is_cheap_structure():
    b = Block()
    b.branch(4)
    b.branch(4, (1, 1))
    b.identity()
    model = b.build()
    (block,) = find_blocks(model)
    assert block.reason is None and block.input == "input"
    assert sorted(block.branches) == ["1x1", "3x3", "BN"]
    plain = Block()
    t = plain.conv("input", 4, 4)
    plain.leaves = [plain.op("Add", [t, plain.op("Relu", ["input"])])]
    assert find_blocks(plain.build()) == []  # an ordinary residual sum is no block


def test_float16_weights_stay_float16():
    b = Block(dtype=np.float16)
    b.branch(4, bn=False)
    b.branch(4, (1, 1), bn=False)
    b.identity(bn=False)
    model = b.build()
    merged, _ = run_pass(model)
    (conv,) = ops(merged, "Conv")
    assert const(merged, conv.input[1]).dtype == np.float16
    assert_equivalent(model, merged, rtol=1e-2)


def test_dilated_block_and_1d_kernels():
    b = Block(hw=(9, 9))
    b.branch(4, (3, 3), dil=2)
    b.branch(4, (1, 1))
    b.branch(4, (1, 3), dil=2)
    b.identity()
    model = b.build()
    merged, _ = run_pass(model)
    (conv,) = ops(merged, "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [3, 3] and attrs["dilations"] == [2, 2]
    assert attrs["pads"] == [2, 2, 2, 2]
    assert_equivalent(model, merged)


def test_sequence_with_pads_on_the_1x1_is_exact():
    """DBB's padding, written as pads on the 1x1 (its border is its bias): exact."""
    b = Block()
    t = b.conv("input", 4, 4, (1, 1), pads=[1, 1, 1, 1], bias=True)
    t = b.bn(t, 4)
    t = b.conv(t, 4, 4, (3, 3), pads=[0, 0, 0, 0])
    b.leaves.append(t)
    b.branch(4)
    model = b.build()
    merged, result = run_pass(model)
    assert result.summary.blocks[0].branches == "3x3 + 1x1>3x3"
    assert_equivalent(model, merged)


# ---- refusals -----------------------------------------------------------------------------------

def _refusal(kind):
    b = Block(hw=(7, 7))
    if kind == "strides":
        b.branch(4, stride=2)
        b.branch(4, (1, 1))
    elif kind == "groups":
        b.branch(4, group=2)
        b.branch(4, (1, 1))
    elif kind == "dilations":
        b.branch(4, dil=2)
        b.branch(4)
    elif kind == "out-channels":
        b.branch(4)
        b.branch(1, (1, 1))
    elif kind == "alignment":
        b.branch(4, stride=2)
        b.branch(4, (1, 1), stride=2, pads=[0, 0, 1, 1])
    elif kind == "read-elsewhere":
        b.branch(4)
        t = b.branch(4, (1, 1))
        b.outputs.append(b.op("Relu", [t]))
    elif kind == "graph-output":
        b.branch(4)
        b.outputs.append(b.branch(4, (1, 1)))
    elif kind == "other-input":
        b.branch(4)
        b.leaves.append(b.op("Relu", ["input"]))
        b.branch(4, (1, 1))
    elif kind == "not-constant":
        b.branch(4)
        b.leaves.append(b.conv("input", 4, 4, (1, 1), weight="w_in"))
        b.extra_inputs.append(helper.make_tensor_value_info("w_in", TensorProto.FLOAT,
                                                            [4, 4, 1, 1]))
    elif kind == "sequence-pads":
        t = b.conv("input", 4, 4, (1, 1), bias=True)
        b.leaves.append(b.conv(t, 4, 4))
        b.branch(4)
    elif kind == "sequence-pad-value":
        t = b.conv("input", 4, 4, (1, 1), bias=True)
        t = b.op("Pad", [t, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
        b.leaves.append(b.conv(t, 4, 4, pads=[0, 0, 0, 0]))
        b.branch(4)
    elif kind == "sequence-kxk":
        t = b.conv("input", 4, 4)
        b.leaves.append(b.conv(t, 4, 4))
        b.branch(4)
    elif kind == "avgpool-exclude-pad":
        b.branch(4)
        b.leaves.append(b.op("AveragePool", ["input"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    return b.build(), b.root


REFUSALS = {
    "strides": "strides differ: [2, 2] (3x3), [1, 1] (1x1)",
    "groups": "groups differ: 2 (3x3), 1 (1x1)",
    "dilations": "dilations differ",
    "out-channels": "output channels differ: 4 (3x3), 1 (1x1)",
    "alignment": "pads are not centre-aligned on spatial axis 0",
    "read-elsewhere": "is also read by 1 other node(s)",
    "graph-output": "is a graph output",
    "other-input": "does not read the shared input 'input'",
    "not-constant": "the weight of Conv 'conv",
    "sequence-pads": "the kxk pads with zeros but the 1x1 output there is not zero",
    "sequence-pad-value": "not the 1x1 output at a zero input",
    "sequence-kxk": "it is a sequence 3x3 -> 3x3",
    "avgpool-exclude-pad": "count_include_pad=0",
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refusals_name_the_reason(kind):
    model, root = _refusal(kind)
    merged, result = run_pass(model)
    assert not result.changes
    (skip,) = result.skips
    assert skip.node == root
    assert REFUSALS[kind] in skip.reason, skip.reason
    assert merged.SerializeToString() == model.SerializeToString()
    (block,) = find_blocks(model)
    assert block.reason == skip.reason


# ---- property test ------------------------------------------------------------------------------

KERNELS = [(3, 3), (1, 1), (1, 3), (3, 1), (5, 5)]


@st.composite
def blocks(draw):
    cin = draw(st.sampled_from([2, 4, 6]))
    group = draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
    cout = cin * draw(st.sampled_from([1, 2]))
    stride = draw(st.sampled_from([1, 2]))
    kernels = draw(st.lists(st.sampled_from(KERNELS), min_size=1, max_size=4))
    flags = draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=len(kernels),
                          max_size=len(kernels)))
    diagonal_ok = cout == cin
    identity = draw(st.sampled_from(["none", "x", "bn"] if diagonal_ok and stride == 1
                                    else ["none"]))
    avg = diagonal_ok and draw(st.booleans())
    sequence = draw(st.sampled_from(["none", "zero-bias", "padded-1x1"]))
    post = draw(st.sampled_from([(), ("bn",), ("scalar",), ("mul",)]))
    use_sum = draw(st.booleans())
    value_seed = draw(st.integers(0, 2**16))
    return dict(cin=cin, group=group, cout=cout, stride=stride, kernels=kernels, flags=flags,
                identity=identity, avg=avg, sequence=sequence, post=post, use_sum=use_sum,
                seed=value_seed)


def build_block(spec):
    b = Block(cin=spec["cin"], hw=(7, 6), seed=spec["seed"])
    cin, cout, g, s = spec["cin"], spec["cout"], spec["group"], spec["stride"]
    for k, (bn, bias) in zip(spec["kernels"], spec["flags"]):
        b.branch(cout, k, bn=bn, bias=bias, stride=s, group=g)
    if spec["identity"] != "none":
        b.identity(bn=spec["identity"] == "bn")
    if spec["avg"]:
        t = b.op("AveragePool", ["input"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                 strides=[s, s], count_include_pad=1)
        b.leaves.append(b.bn(t, cin))
    if spec["sequence"] != "none":
        padded = spec["sequence"] == "padded-1x1"
        t = b.conv("input", cin, cin, (1, 1), group=g, bias=padded,
                   pads=[1, 1, 1, 1] if padded else [0, 0, 0, 0])
        t = b.bn(t, cin) if padded else t
        b.leaves.append(b.conv(t, cin, cout, (3, 3), stride=s, group=g,
                               pads=[0, 0, 0, 0] if padded else [1, 1, 1, 1]))
    return b.build(post=spec["post"], use_sum=spec["use_sum"], out_channels=cout)


@seed(20240611)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_property_merge_is_equivalent_and_idempotent(spec):
    leaves = (len(spec["kernels"]) + (spec["identity"] != "none") + spec["avg"]
              + (spec["sequence"] != "none"))
    assume(leaves >= 2)
    model = build_block(spec)
    merged, result = run_pass(model)
    assert not result.skips, result.skips
    assert len(ops(merged, "Conv")) == 1 and len(merged.graph.node) == 1
    assert_equivalent(model, merged)
    again, second = run_pass(merged)
    assert not second.changes and again.SerializeToString() == merged.SerializeToString()


# ---- command line -------------------------------------------------------------------------------

def _save(model, path):
    onnx.save(model, str(path))
    return path


def _mergeable():
    b = Block()
    b.branch(4)
    b.branch(4, (1, 1))
    b.identity()
    return b.build(post=("relu",))


def test_cli_writes_default_output_and_table(tmp_path, capsys):
    src = _save(_mergeable(), tmp_path / "net.onnx")
    assert main(["reparam", str(src)]) == 0
    out = capsys.readouterr().out
    dst = tmp_path / "net.deploy.onnx"
    assert dst.exists() and len(ops(onnx.load(str(dst)), "Conv")) == 1
    assert "3x3 + 1x1 + BN" in out and "2 -> 1" in out
    assert "merged 1 block(s), 0 left; Convs 2 -> 1, BatchNormalization 3 -> 0; verified" in out
    assert main(["reparam", str(src)]) == 2  # output exists without --force
    assert "output exists" in capsys.readouterr().err


def test_cli_json_and_skips(tmp_path, capsys):
    model, root = _refusal("groups")
    src = _save(model, tmp_path / "g.onnx")
    assert main(["reparam", str(src), "-o", str(tmp_path / "o.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.reparam" and doc["blocks"] == []
    assert doc["skipped"][0]["node"] == root and "groups differ" in doc["skipped"][0]["reason"]
    assert doc["convs"] == {"before": 2, "after": 2}


def test_cli_bad_input_and_failed_check(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["reparam", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read ONNX" in err[0]
    src = _save(_mergeable(), tmp_path / "net.onnx")
    dst = tmp_path / "out.onnx"
    assert main(["reparam", str(src), "-o", str(dst), "--rtol", "1e-12"]) == 3
    assert not dst.exists() and "nothing written" in capsys.readouterr().err


def test_verification_error_from_the_api():
    with pytest.raises(VerificationError):
        reparameterize(_mergeable(), rtol=1e-12)
