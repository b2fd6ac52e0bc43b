import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from graphs import Chain, batch_for
from onnxrep import verify
from onnxrep.analysis.statistics import collect_statistics
from onnxrep.ir.graph import GraphIndex, set_attr
from onnxrep.pipeline import OptimizeConfig, optimize_with_details
from onnxrep.passes.absorb_bias import AbsorbHighBias


def raise_biases(model, nodes, by=3.0):
    index = GraphIndex(model.graph)
    for i in nodes:
        name = model.graph.node[i].input[2]
        index.set_const(name, index.const(name) + by)
    return model



def absorb(model, x):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, AbsorbHighBias(collect_statistics(work, x))(work)


def assert_exact_on(model, other, x, rtol=1e-5):
    cmp = verify.compare(model, other, {"input": x})
    assert cmp.rel <= rtol, cmp.summary()


def pointwise_net(group=2, bias2=True):
    c = Chain(channels=3, hw=(8, 8), seed=2).conv(8, scale=0.1).relu()
    c.conv(6, k=1, pad=0, group=group, bias=bias2).relu().gap().flatten().gemm(4)
    return raise_biases(c.build(), [0] + ([2] if bias2 else []))


def test_absorbed_exactly_on_data_and_range_shrinks():
    model = pointwise_net()
    x = batch_for(model)
    work, result = absorb(model, x)
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [c.nodes for c in result.changes] == [tuple(names[:2]), tuple(names[1:])]
    assert_exact_on(model, work, x)
    before = collect_statistics(model, x)
    after = collect_statistics(work, x)
    z = model.graph.node[0].output[0]
    moved = before[z].min > 0
    assert moved.any()
    np.testing.assert_allclose(after[z].min[moved], 0.0, atol=1e-5)
    np.testing.assert_allclose(after[z].max, before[z].max - np.where(moved, before[z].min, 0),
                               rtol=1e-5)
    assert not AbsorbHighBias(after)(work).modified  # a second run changes nothing


def test_changes_off_the_data_only_below_the_minimum():
    model = pointwise_net()
    x = batch_for(model)
    work, _ = absorb(model, x)
    far = batch_for(model, seed=1) * 4  # pre-activations below the calibration minimum
    assert verify.compare(model, work, {"input": far}).rel > 1e-4


def test_padded_conv_is_refused_with_the_reason():
    c = Chain(channels=3, hw=(8, 8)).conv(8, scale=0.1).relu().conv(6, k=3, pad=1)
    model = raise_biases(c.build(), [0])
    work, result = absorb(model, batch_for(model))
    assert not result.modified
    (skip,) = result.skips
    assert "pads its input" in skip.reason and "border pixels" in skip.reason
    assert "border pixels would read 0" in skip.reason
    set_attr(model.graph.node[2], "pads", [0, 0, 0, 0])
    set_attr(model.graph.node[2], "auto_pad", b"SAME_UPPER")
    del model.graph.node[2].attribute[[a.name for a in model.graph.node[2].attribute].index(
        "pads")]
    _, result = absorb(model, batch_for(model))
    assert "auto_pad SAME_UPPER" in result.skips[0].reason


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("gap", [True, False])
def test_into_gemm_after_flatten(trans_b, gap):
    c = Chain(channels=2, hw=(4, 4), seed=3).conv(5, scale=0.1).relu()
    if gap:
        c.gap()
    c.flatten().gemm(3, trans_b=trans_b)
    model = raise_biases(c.build(), [0])
    gemm = model.graph.node[-1]
    set_attr(gemm, "alpha", 0.7)
    set_attr(gemm, "beta", 1.5)
    x = batch_for(model)
    work, result = absorb(model, x)
    assert result.changes and result.changes[0].nodes[1].startswith("Gemm")
    assert_exact_on(model, work, x)


def test_layers_without_bias_get_one():
    c = Chain(channels=3, hw=(6, 6), seed=4).conv(4, scale=0.1, bias=False).relu()
    c.conv(3, k=1, pad=0, bias=False)
    model = c.build()
    x = np.abs(batch_for(model)) + 1.0  # positive inputs through positive weights: z > 0
    index = GraphIndex(model.graph)
    w = model.graph.node[0].input[1]
    index.set_const(w, np.abs(index.const(w)))
    work, result = absorb(model, x)
    assert result.modified and len(work.graph.node[0].input) == 3
    assert work.graph.node[2].input[2]
    assert_exact_on(model, work, x)


def test_fan_out_and_missing_statistics_are_skipped():
    c = Chain(channels=3, hw=(6, 6)).conv(4).relu().conv(3, k=1, pad=0)
    model = raise_biases(c.build(), [0])
    relu_out = model.graph.node[1].output[0]
    model.graph.node.append(helper.make_node("Relu", [relu_out], ["extra"]))
    model.graph.output.append(helper.make_empty_tensor_value_info("extra"))
    x = batch_for(model)
    result = AbsorbHighBias(collect_statistics(model, x))(onnx.ModelProto.FromString(
        model.SerializeToString()))
    assert "read by 2 nodes" in result.skips[0].reason
    plain = raise_biases(c.build(), [0])
    result = AbsorbHighBias(collect_statistics(plain, x, []))(plain)
    assert "no statistics" in result.skips[0].reason and not result.modified


@settings(max_examples=25, deadline=None)
@given(cin=st.sampled_from([2, 4]), groups=st.sampled_from([1, 2]), mult=st.integers(1, 3),
       shift=st.floats(0.0, 5.0), seed=st.integers(0, 1000))
def test_absorption_property(cin, groups, mult, shift, seed):
    cout = 2 * mult * groups
    c = Chain(channels=cin, hw=(5, 5), seed=seed).conv(cout, scale=0.2).relu()
    c.conv(3 * groups, k=1, pad=0, group=groups).relu().gap().flatten().gemm(2)
    model = raise_biases(c.build(), [0], shift)
    x = batch_for(model, 16, seed)
    work, _ = absorb(model, x)
    assert_exact_on(model, work, x)


def test_optimize_with_calib_runs_absorption_verified_on_all_data():
    model = pointwise_net()
    x = batch_for(model, 70)
    result = optimize_with_details(model, OptimizeConfig(batch_size=16), calib=x)
    passes = dict(result.results)
    assert passes["absorb-bias"].modified
    assert result.data_comparison is not None and result.data_comparison.rel <= 1e-4
    assert verify.compare(model, result.model, {"input": x}).rel <= 1e-4
    off = optimize_with_details(model, OptimizeConfig(absorb_bias=False), calib=x)
    assert "absorb-bias" not in dict(off.results)
