from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphs import Chain, conv_relu_conv, depthwise_chain, mobileone_like
from onnxrep import verify
from onnxrep.ir.graph import GraphIndex
from onnxrep.pipeline import OptimizeConfig, optimize_with_details
from onnxrep.passes.equalize import EqualizeConfig, EqualizeCrossLayer, channel_scales, find_pairs
from onnxrep.analysis.weights import weight_stats


def equalize(model, **kw):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return EqualizeCrossLayer(EqualizeConfig(**{"never_worse": False, **kw}))(work)


def assert_equivalent(a, b, rtol=1e-5, seed=0):
    feeds = verify.random_inputs(a, seed=seed)
    cmp = verify.compare(a, b, feeds)
    assert cmp.rel <= rtol, cmp.summary()


def in_ranges_bruteforce(w, group):
    """max |w| over everything that reads input channel c, by explicit loops."""
    cout, cin_g = w.shape[:2]
    cin = cin_g * group
    out = np.zeros(cin)
    for c in range(cin):
        g, j = divmod(c, cin_g)
        rows = range(g * cout // group, (g + 1) * cout // group)
        out[c] = max(np.abs(w[o, j]).max() for o in rows)
    return out


def ranges_of_pair(model, pair):
    index = GraphIndex(model.graph)
    w1 = index.const(index.node(pair.first).input[1])
    second = index.node(pair.second)
    w2 = index.const(second.input[1])
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    if second.op_type == "Conv":
        group = next((a.i for a in second.attribute if a.name == "group"), 1)
        r2 = in_ranges_bruteforce(w2, group)
    else:
        trans_b = next((a.i for a in second.attribute if a.name == "transB"), 0)
        k_by_n = w2.T if trans_b else w2
        r2 = np.abs(k_by_n).reshape(r1.size, -1).max(axis=1)
    return r1, r2


def test_conv_relu_conv_one_round_equalizes_ranges_exactly():
    model = conv_relu_conv()
    result = equalize(model, iterations=1, relaxation=1.0)
    pairs, _ = find_pairs(result.model)
    assert len(pairs) == 1 and len(result.changes) == 1
    r1, r2 = ranges_of_pair(result.model, pairs[0])
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    assert_equivalent(model, result.model)


def test_model_argument_is_not_mutated_and_second_run_changes_nothing():
    model = mobileone_like()
    before = model.SerializeToString()
    first = optimize_with_details(model)
    assert model.SerializeToString() == before
    second = optimize_with_details(first.model)
    assert not dict(second.results)["equalize"].changes
    assert second.model.SerializeToString() == first.model.SerializeToString()


def test_mobileone_like_spread_falls_tenfold_and_stays_equivalent():
    model = mobileone_like()
    result = optimize_with_details(model, OptimizeConfig(rtol=1e-4))
    worst_before = max(s.spread for s in result.before)
    worst_after = max(s.spread for s in result.after)
    assert worst_before > 100
    assert worst_after * 10 <= worst_before
    assert result.comparison.rel <= 1e-4
    classifier = [s for s in result.after if s.op == "Gemm"]
    assert classifier and classifier[0].spread < 10


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_triplet_and_depth_multiplier(multiplier):
    model = depthwise_chain(multiplier)
    pairs, _ = find_pairs(model)
    assert len(pairs) == 2
    result = equalize(model, iterations=100, tolerance=1e-6)
    assert_equivalent(model, result.model)
    assert result.summary.converged
    for pair in find_pairs(result.model)[0]:
        r1, r2 = ranges_of_pair(result.model, pair)
        np.testing.assert_allclose(r1, r2, rtol=1e-4)


def test_grouped_conv_uses_per_group_input_mapping():
    model = (Chain(channels=4, seed=3).conv(8, k=1).relu()
             .conv(6, group=2, outliers={4: 50.0}).build())
    result = equalize(model, iterations=1, relaxation=1.0)
    pair = find_pairs(result.model)[0][0]
    r1, r2 = ranges_of_pair(result.model, pair)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    assert_equivalent(model, result.model)


def test_conv_without_group_attribute_and_unnamed_nodes():
    model = Chain().conv(8, group_attr=False, name="").relu(name="").conv(4, name="").build()
    result = equalize(model)
    assert result.changes and result.changes[0].nodes == ("Conv#0", "Conv#2")
    assert_equivalent(model, result.model)


def _through(op_builder, **chain_kw):
    c = Chain(seed=5, **chain_kw).conv(8, outliers={1: 30.0})
    op_builder(c)
    return c


THROUGH = {
    "Relu": lambda c: c.relu().conv(4),
    "LeakyRelu": lambda c: c.node("LeakyRelu", [], alpha=0.1).conv(4),
    "PRelu": lambda c: c.node("PRelu", [c.const(np.linspace(0.05, 0.3, 8).astype(
        np.float32).reshape(8, 1, 1), "slope")]).conv(4),
    "MaxPool": lambda c: c.relu().node("MaxPool", [], kernel_shape=[2, 2], strides=[2, 2],
                                       pads=[1, 1, 1, 1]).conv(4),
    "AveragePool": lambda c: c.node("AveragePool", [], kernel_shape=[3, 3],
                                    pads=[1, 1, 1, 1]).conv(4),
    "Pad": lambda c: c.node("Pad", [c.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]
                            ).conv(4, pad=0),
    "Identity": lambda c: c.node("Identity", []).conv(4),
    "GAP-Flatten-Gemm": lambda c: c.relu().gap().flatten().gemm(5),
    "GAP-Reshape-Gemm": lambda c: c.relu().gap().flatten(reshape=True).gemm(5, trans_b=False),
    "Flatten-Gemm-spatial": lambda c: c.relu().flatten().gemm(5),
    "Flatten-MatMul": lambda c: c.relu().gap().flatten().matmul(5),
    "Gemm-Relu-Gemm": lambda c: c.relu().gap().flatten().gemm(6).relu().gemm(3),
}


@pytest.mark.parametrize("name", THROUGH)
def test_chains_through_scale_commuting_ops(name):
    model = _through(THROUGH[name]).build()
    result = equalize(model)
    assert result.changes, [s.reason for s in result.skips]
    assert_equivalent(model, result.model)


REFUSED = {
    "Clip": (lambda c: c.node("Clip", [c.const(np.float32(0), "lo"), c.const(np.float32(6), "hi")]
                              ).conv(4), "Clip"),
    "Sigmoid": (lambda c: c.node("Sigmoid", []).conv(4), "Sigmoid"),
    "HardSwish": (lambda c: c.node("HardSwish", []).conv(4), "HardSwish"),
    "Mul": (lambda c: c.node("Mul", [c.const(np.float32(2.0), "k")]).conv(4), "Mul"),
    "Pad-nonzero": (lambda c: c.node("Pad", [c.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                                             c.const(np.float32(1.0), "v")]).conv(4, pad=0),
                    "non-zero"),
    "Pad-channels": (lambda c: _grow_channels(c.node(
        "Pad", [c.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))]), 2).conv(4, pad=0),
        "channel axis"),
    "MatMul-on-conv": (lambda c: c.node("MatMul", [c.const(np.ones((8, 8), np.float32))]),
                       "does not contract"),
}


def _grow_channels(c, extra):
    c.channels += extra
    return c


@pytest.mark.parametrize("name", REFUSED)
def test_chain_ends_with_reason(name):
    build, reason = REFUSED[name]
    c = Chain(seed=5).conv(8, outliers={1: 30.0})
    build(c)
    model = c.build()
    result = equalize(model)
    assert not result.changes
    assert any(reason in s.reason for s in result.skips), [s.reason for s in result.skips]
    assert_equivalent(model, result.model, rtol=0)


def _residual_model():
    c = Chain(seed=2).conv(8).relu()
    skip = c.tensor
    c.conv(8, outliers={0: 20.0}).relu().conv(8)
    c.nodes.append(helper.make_node("Add", [c.tensor, skip], ["sum"], name="add"))
    c.tensor = "sum"
    return c.build()


def test_residual_add_and_fan_out_end_chains():
    model = _residual_model()
    result = equalize(model)
    reasons = " | ".join(s.reason for s in result.skips)
    assert "read by 2 nodes" in reasons and "Add" in reasons
    assert len(result.changes) == 1  # only the middle conv pair is a chain
    assert_equivalent(model, result.model)


def test_shared_weight_is_refused():
    c = Chain(channels=8, seed=1).conv(8)
    c.relu().node("Conv", [c.nodes[0].input[1]], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    result = equalize(c.build())
    assert not result.changes
    assert any("shared by 2 nodes" in s.reason for s in result.skips)


def test_weight_as_graph_input_is_not_a_constant():
    model = conv_relu_conv()
    w = model.graph.node[0].input[1]
    init = next(t for t in model.graph.initializer if t.name == w)
    model.graph.input.append(helper.make_tensor_value_info(w, init.data_type, list(init.dims)))
    result = equalize(model)
    assert not result.changes
    assert any("not a constant" in s.reason for s in result.skips)


def test_dead_channels_never_give_nan():
    model = Chain(seed=4).conv(8, dead=(0, 3)).relu().conv(6, outliers={2: 100.0}).build()
    result = equalize(model)
    index = GraphIndex(result.model.graph)
    for name in index.initializers:
        assert np.all(np.isfinite(index.const(name)))
    w1 = index.const(result.model.graph.node[0].input[1])
    assert np.all(w1[[0, 3]] == 0)
    assert_equivalent(model, result.model)


def test_channel_scales_dead_threshold_and_clamp():
    cfg = EqualizeConfig(threshold=0.5, max_scale=10.0)
    s = channel_scales(np.array([0.0, 4.0, 0.1, 1e6, 1.0]),
                       np.array([5.0, 1.0, 0.1, 1.0, np.inf]), cfg)
    assert s[0] == 1.0  # dead on the first side
    assert s[1] == pytest.approx(2.0)
    assert s[2] == 1.0  # r1 + r2 below the threshold
    assert s[3] == 10.0  # clamped
    assert s[4] == 1.0  # not finite
    assert np.all(np.isfinite(s))


def test_constant_node_weights_are_equalized_in_place():
    model = conv_relu_conv()
    graph = model.graph
    for name in [graph.node[0].input[1], graph.node[2].input[1]]:
        init = next(t for t in graph.initializer if t.name == name)
        graph.node.insert(0, helper.make_node("Constant", [], [name], value=init))
        graph.initializer.remove(init)
    result = equalize(model)
    assert result.changes
    assert sum(n.op_type == "Constant" for n in result.model.graph.node) == 2
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets(opset):
    c = Chain(seed=7, opset=opset).conv(8, outliers={3: 25.0}).relu()
    c.node("Pad", [c.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]).conv(4, pad=0)
    model = c.build()
    result = equalize(model)
    assert len(result.changes) == 1
    assert_equivalent(model, result.model)


def test_converged_ranges_are_stable_across_runs():
    model = mobileone_like(seed=3)
    first = equalize(model, iterations=200)
    assert first.summary.converged
    second = equalize(first.model, iterations=200)
    assert not second.changes and second.summary.rounds == 1


# ---- property tests ----------------------------------------------------------------------

@st.composite
def random_chain(draw):
    seed = draw(st.integers(0, 2**16))
    cin = draw(st.integers(1, 4))
    c = Chain(channels=cin, hw=(9, 9), seed=seed)
    for _ in range(draw(st.integers(2, 4))):
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if c.channels % g == 0]))
        depthwise = draw(st.booleans())
        if depthwise:
            groups = c.channels
        mult = draw(st.integers(1, 3))
        cout = c.channels * mult if depthwise else groups * draw(st.integers(1, 4))
        k = draw(st.sampled_from([1, 3])) if min(c.hw) >= 3 else 1
        stride = draw(st.sampled_from([1, 2])) if min(c.hw) > 3 else 1
        outliers = {draw(st.integers(0, cout - 1)): draw(st.floats(1, 500))}
        dead = tuple(draw(st.lists(st.integers(0, cout - 1), max_size=2)))
        c.conv(cout, k=k, group=groups, stride=stride, pad=draw(st.integers(0, k // 2)),
               bias=draw(st.booleans()), outliers=outliers, dead=dead)
        op = draw(st.sampled_from(["Relu", "LeakyRelu", "PRelu", "MaxPool", "Pad", "none"]))
        if op == "Relu":
            c.relu()
        elif op == "LeakyRelu":
            c.node("LeakyRelu", [], alpha=0.2)
        elif op == "PRelu":
            c.node("PRelu", [c.const(np.full((c.channels, 1, 1), 0.1, np.float32), "slope")])
        elif op == "MaxPool" and min(c.hw) >= 2:
            c.node("MaxPool", [], kernel_shape=[2, 2], strides=[1, 1])
            c.hw = (c.hw[0] - 1, c.hw[1] - 1)
        elif op == "Pad":
            c.node("Pad", [c.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
            c.hw = (c.hw[0] + 2, c.hw[1] + 2)
    if draw(st.booleans()):
        c.relu().gap().flatten().gemm(draw(st.integers(2, 6)))
    return c.build()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_chain())
def test_property_function_preserved_and_idempotent(model):
    first = optimize_with_details(model, OptimizeConfig(rtol=1e-4))
    assert first.comparison.rel <= 1e-4
    for s in weight_stats(first.model):
        assert np.isfinite(s.max_abs)
    second = optimize_with_details(first.model)
    eq = dict(second.results)["equalize"]
    if dict(first.results)["equalize"].summary.converged:
        assert not eq.changes


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), cout=st.integers(1, 12), group=st.sampled_from([1, 2, 3]),
       k=st.sampled_from([1, 3, 5]))
def test_property_one_round_equalizes_a_single_pair(seed, cout, group, k):
    c = Chain(channels=3, seed=seed).conv(6, k=k, outliers={seed % 6: 1 + seed % 200})
    c.relu().conv(group * cout, group=group, k=3)
    model = c.build()
    result = equalize(model, iterations=1, tolerance=0.0, relaxation=1.0)
    pair = find_pairs(result.model)[0][0]
    r1, r2 = ranges_of_pair(result.model, pair)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    assert_equivalent(model, result.model, rtol=1e-5)


def test_optimize_in_place_copies_only_for_a_data_check():
    model = conv_relu_conv()
    assert optimize_with_details(model, copy=False).model is model
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    result = optimize_with_details(model, calib={"input": x}, copy=False)
    assert result.model is model


def _chain_with_mixed_magnitudes(seed=7, channels=4):
    """Three 1x1 convs whose weights span four decades inside each tensor: equalizing their
    ranges lowers the per-channel INT8 precision the weights had."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k in range(3):
        w = rng.normal(size=(channels, channels, 1, 1)) * rng.choice(
            [0.01, 1, 100], size=(channels, channels, 1, 1))
        nodes.append(helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"]))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{k}"))
        x = f"c{k}"
        if k < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{k}"]))
            x = f"r{k}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _channel_sqnr_sum(model):
    return sum(s.channel_sqnr_db for s in weight_stats(model))


def test_pairs_that_would_lower_weight_precision_are_left_unscaled():
    model = _chain_with_mixed_magnitudes()
    guarded = equalize(model, never_worse=True)
    plain = equalize(model)
    undone = [s for s in guarded.skips if "would lower their summed" in s.reason]
    assert len(undone) == 2 and not guarded.changes and len(plain.changes) == 2
    assert "left unscaled" in undone[0].reason
    assert_equivalent(model, guarded.model)
    assert _channel_sqnr_sum(guarded.model) >= _channel_sqnr_sum(model) - 1e-6
    assert _channel_sqnr_sum(plain.model) < _channel_sqnr_sum(model)


def test_guard_keeps_every_pair_of_the_shipped_mobileone():
    path = Path(__file__).resolve().parents[1] / "models" / "mobileone_fmnist.onnx"
    if not path.exists():
        pytest.skip("shipped model absent")
    result = EqualizeCrossLayer()(onnx.load(path))
    assert result.summary.pairs == len(result.changes) == 13
    assert not [s for s in result.skips if "would lower" in s.reason]


def test_conv_transpose_is_reported_not_silently_left():
    c = Chain(channels=2, seed=0).conv(4).relu()
    model = c.build()
    w = numpy_helper.from_array(np.ones((4, 2, 2, 2), np.float32), "wt")
    model.graph.initializer.append(w)
    last = model.graph.output[0].name
    node = helper.make_node("ConvTranspose", [last, "wt"], ["up"], name="up", strides=[2, 2])
    model.graph.node.append(node)
    model.graph.output[0].name = "up"
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    result = equalize(model)
    assert any(s.node == "up" and "ConvTranspose is not equalized" in s.reason
               for s in result.skips)
