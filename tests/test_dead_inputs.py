import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphs import Chain
from onnxrep import verify
from onnxrep.analysis.statistics import collect_statistics
from onnxrep.cli import main
from onnxrep.ir.graph import GraphIndex
from onnxrep.pipeline import OptimizeConfig, optimize_with_details, relu_inputs
from onnxrep.passes.dead_inputs import (DeadInputsSummary, Interval, ZeroDeadInputs,
                                       propagate_intervals)
from onnxrep.analysis.weights import weight_stats


def inputs(model, n=48, seed=0, lo=-1.0, hi=1.0):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def edit(model, i, slot, fn):
    index = GraphIndex(model.graph)
    name = model.graph.node[i].input[slot]
    index.set_const(name, fn(index.const(name).copy()))


def with_dead(model, proven=(1,), observed=(4,)):
    """Channel ``proven`` of conv 0 has zero weights and a negative bias (dead for any input);
    ``observed`` has small weights and a bias that keeps it negative for inputs in
    [-0.5, 0.5] and on uniform data in [-1, 1] (sums of 27 inputs stay far from 27) but not
    for every input in [-1, 1]."""
    def first(w):
        for c in proven:
            w[c] = 0
        for c in observed:
            w[c] = 0.01
        return w

    def bias(b):
        b[list(proven)] = -0.5
        b[list(observed)] = -0.6 * 0.01 * w_size - 0.01
        return b

    w_size = int(np.prod(GraphIndex(model.graph).const(model.graph.node[0].input[1]).shape[1:]))
    edit(model, 0, 1, first)
    edit(model, 0, 2, bias)
    return model


def run_pass(model, stats=None, input_range=None):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work, ZeroDeadInputs(stats, input_range)(work)


def relu_stats(model, x):
    return collect_statistics(model, x, relu_inputs(model))


def dense_net(consumer_group=1):
    c = Chain(channels=3, hw=(6, 6), seed=5).conv(8).relu()
    c.conv(8 if consumer_group > 1 else 6, group=consumer_group, outliers={0: 3.0}).relu()
    return c.gap().flatten().gemm(4).build()


def consumer_weight(model, i=2):
    return GraphIndex(model.graph).const(model.graph.node[i].input[1])


def test_observed_and_proven_channels():
    model = with_dead(dense_net())
    x = inputs(model)
    work, result = run_pass(model, relu_stats(model, x), (-1.0, 1.0))
    assert result.summary == DeadInputsSummary(dead=2, constant=0, proven=1, observed=1,
                                               samples=48)
    (change,) = result.changes
    assert "input channels 1, 4" in change.detail and "1 proven, 1 observed" in change.detail
    w = consumer_weight(work)
    assert not w[:, [1, 4]].any() and w[:, [0, 2, 3]].all()
    assert verify.compare(model, work, {"input": x}).rel <= 1e-6


def test_proof_without_data_depends_on_the_range():
    model = with_dead(dense_net())
    work, result = run_pass(model, None, (-0.5, 0.5))
    assert result.summary.proven == 2  # small inputs cannot beat channel 4's bias
    work, result = run_pass(model, None, (-1.0, 1.0))
    assert result.summary == DeadInputsSummary(dead=1, constant=0, proven=1, observed=0)
    x = inputs(model, lo=-1, hi=1)
    assert verify.compare(model, work, {"input": x}).rel <= 1e-6


def test_observed_only_holds_on_the_data():
    model = with_dead(dense_net(), proven=(), observed=(4,))
    x = inputs(model)
    work, result = run_pass(model, relu_stats(model, x))
    assert result.summary.observed == 1 and result.summary.proven == 0
    assert verify.compare(model, work, {"input": x}).rel <= 1e-6
    far = inputs(model, lo=-30, hi=30)  # channel 4 fires here: the edit shows
    assert verify.compare(model, work, {"input": far}).rel > 1e-6


def test_depthwise_consumer_loses_its_outlier_kernel():
    model = with_dead(dense_net(consumer_group=8), proven=(1,), observed=())
    edit(model, 2, 1, lambda w: (w.__setitem__(1, 1155.0), w)[1])
    before = max(s.max_abs for s in weight_stats(model) if s.groups == 8)
    work, result = run_pass(model, None, (-1.0, 1.0))
    w = consumer_weight(work)
    assert not w[1].any() and w[[0, 2, 3, 5, 6, 7]].all()
    after = max(s.max_abs for s in weight_stats(work) if s.groups == 8)
    assert before == pytest.approx(1155.0) and after < 10
    assert "max |w| removed 1.16e+03" in result.changes[0].detail


@pytest.mark.parametrize("head", ["gap", "flatten", "maxpool"])
def test_reaches_gemm_and_matmul_through_flatten(head):
    c = Chain(channels=2, hw=(4, 4), seed=6).conv(5).relu()
    if head == "gap":
        c.gap().flatten().gemm(3, trans_b=False)
    elif head == "flatten":
        c.flatten().matmul(3)
    else:
        c.node("MaxPool", [], kernel_shape=[2, 2], strides=[2, 2])
        c.hw = (2, 2)
        c.flatten().gemm(3)
    model = with_dead(c.build(), proven=(2,), observed=())
    work, result = run_pass(model, None, (-1.0, 1.0))
    assert result.modified
    index, last = GraphIndex(work.graph), work.graph.node[-1]
    w = index.const(last.input[1])
    hw = {"gap": 1, "flatten": 16, "maxpool": 4}[head]
    rows = slice(2 * hw, 3 * hw)
    block = w[:, rows] if last.op_type == "Gemm" and head == "maxpool" else w[rows]
    assert not block.any()
    x = inputs(model)
    assert verify.compare(model, work, {"input": x}).rel <= 1e-6


def test_consumers_that_cannot_be_edited_say_why():
    model = with_dead(dense_net(), proven=(1,), observed=())
    index = GraphIndex(model.graph)
    relu_out = model.graph.node[1].output[0]
    w = index.const(model.graph.node[2].input[1])
    model.graph.node.append(helper.make_node("Conv", [relu_out, model.graph.node[2].input[1]],
                                             ["second"], kernel_shape=[3, 3], pads=[1] * 4))
    model.graph.output.append(helper.make_tensor_value_info("second", TensorProto.FLOAT,
                                                            [None, w.shape[0], 6, 6]))
    model.graph.initializer.append(numpy_helper.from_array(
        np.ones((6, 3), np.float32), "M"))
    model.graph.node.append(helper.make_node("MatMul", [relu_out, "M"], ["mm"]))
    model.graph.output.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, None))
    _, result = run_pass(model, None, (-1.0, 1.0))
    reasons = " | ".join(s.reason for s in result.skips)
    assert "shared by 2 nodes" in reasons and "does not contract the channel axis" in reasons
    assert not result.modified


def test_second_run_changes_nothing():
    model = with_dead(dense_net())
    x = inputs(model)
    work, _ = run_pass(model, relu_stats(model, x), (-1.0, 1.0))
    again, result = run_pass(work, relu_stats(work, x), (-1.0, 1.0))
    assert not result.modified and again.SerializeToString() == work.SerializeToString()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lo=st.floats(-3, 0), width=st.floats(0.1, 4),
       pad=st.sampled_from([0, 1]), pool=st.booleans(), group=st.sampled_from([1, 2]))
def test_intervals_contain_every_value(seed, lo, width, pad, pool, group):
    """Soundness: on random inputs inside the range, every tensor stays within its bounds."""
    hi = lo + width
    c = Chain(channels=2, hw=(6, 6), seed=seed).conv(4, pad=pad).relu()
    if pool:
        c.node("MaxPool", [], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1])
        c.hw = (4, 4) if pad else (3, 3)
    c.conv(4, k=3, group=group, pad=pad).node("Add", [c.const(np.float32(0.3) * np.arange(
        4, dtype=np.float32).reshape(4, 1, 1))]).relu()
    model = c.gap().flatten().gemm(3).build()
    bounds = propagate_intervals(model, {"input": Interval.of(lo, hi)})
    x = np.random.default_rng(seed).uniform(lo, hi, (64, 2, 6, 6)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n.output[0] for n in model.graph.node]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names[:-1])
    values = verify.run(probe, {"input": x})
    assert set(names) <= set(bounds)
    for name in names:
        v = np.moveaxis(values[name], 1, 0).reshape(values[name].shape[1], -1)
        b = bounds[name].sized(v.shape[0])
        tol = 1e-4 * (1 + np.abs(b.hi) + np.abs(b.lo))
        assert np.all(v.min(axis=1) >= b.lo - tol) and np.all(v.max(axis=1) <= b.hi + tol)


def test_optimize_applies_cleanup_with_data_or_a_range():
    model = with_dead(dense_net(consumer_group=8), proven=(1,), observed=(4,))
    edit(model, 2, 1, lambda w: (w.__setitem__(4, 900.0), w)[1])
    x = inputs(model, 64)
    with_data = optimize_with_details(model, OptimizeConfig(), calib=x)
    dead = dict(with_data.results)["dead-inputs"]
    # channels 1 and 4 of conv 0, and the depthwise channels fed only by them if their bias
    # is negative (then they are constant and negative too)
    assert dead.summary.observed >= 1 and dead.summary.proven >= 1
    assert any("input channels 1, 4 " in c.detail for c in dead.changes)
    assert with_data.data_comparison.rel <= 1e-4
    assert max(s.max_abs for s in with_data.after) < 100
    free = optimize_with_details(model, OptimizeConfig(input_range=(-1.0, 1.0)))
    assert dict(free.results)["dead-inputs"].summary.proven >= 1
    assert free.comparison.rel <= 1e-4
    none = optimize_with_details(model, OptimizeConfig())
    assert "dead-inputs" not in dict(none.results)


def test_cli_optimize_with_calib_and_input_range(tmp_path, capsys):
    model = with_dead(dense_net(consumer_group=8), proven=(1,), observed=(4,))
    src = tmp_path / "net.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=inputs(model, 40))
    assert main(["optimize", str(src), "--calib", str(calib), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in doc["passes"]]
    assert names == ["dead-inputs", "equalize", "absorb-bias"]
    assert doc["verification_on_data"] is not None
    assert main(["optimize", str(src), "--input-range=-1,1", "-o",
                 str(tmp_path / "free.onnx")]) == 0
    assert "proven, 0 observed only); their weights zeroed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["optimize", str(src), "--input-range", "1;2"])
    with pytest.raises(SystemExit) as exc:  # checked at parse time
        main(["optimize", str(src), "--input-range=2,1", "--force"])
    assert exc.value.code == 2
    assert main(["optimize", str(src), "--calib", str(tmp_path / "none.npz"), "--force"]) == 2


def test_relu6_clip_counts_as_a_zero_floor():
    model = with_dead(dense_net(), proven=(1,), observed=())
    relu = model.graph.node[1]
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0), "lo6"),
                                    numpy_helper.from_array(np.float32(6), "hi6")])
    relu.op_type = "Clip"
    relu.input.extend(["lo6", "hi6"])
    assert relu_inputs(model)[0] == model.graph.node[0].output[0]
    work, result = run_pass(model, None, (-1.0, 1.0))
    assert result.summary.proven == 1 and not consumer_weight(work)[:, 1].any()


def constant_net(pad2=0):
    """conv -> relu (channel 2: zero weights, bias +0.7: constant 0.7) -> depthwise conv
    (no padding unless ``pad2``) with a 1e3 weight on channel 2 -> relu -> GAP -> Gemm."""
    c = Chain(channels=3, hw=(6, 6), seed=7).conv(4).relu().conv(4, group=4, pad=pad2).relu()
    model = c.gap().flatten().gemm(3).build()
    edit(model, 0, 1, lambda w: (w.__setitem__(2, 0.0), w)[1])
    edit(model, 0, 2, lambda b: (b.__setitem__(2, 0.7), b)[1])
    edit(model, 2, 1, lambda w: (w.__setitem__(2, 1000.0), w)[1])
    return model


def test_constant_channels_fold_into_the_bias():
    model = constant_net()
    x = inputs(model)
    for stats, bounds, proven in ((relu_stats(model, x), None, 0), (None, (-1.0, 1.0), 1)):
        work, result = run_pass(model, stats, bounds)
        # channel 2 of the depthwise output is constant too (a constant in, no padding)
        assert result.summary.constant == 2 and result.summary.proven == 2 * proven
        assert "1 constant, folded into the bias" in result.changes[0].detail
        w = consumer_weight(work)
        assert not w[2].any() and max(s.max_abs for s in weight_stats(work)) < 10
        assert verify.compare(model, work, {"input": x}).rel <= 1e-5
        wide = inputs(model, lo=-50, hi=50)  # still constant: proven for any input
        assert verify.compare(model, work, {"input": wide}).rel <= 1e-5


def test_constant_channel_into_a_padded_conv_is_kept_with_the_reason():
    model = constant_net(pad2=1)
    work, result = run_pass(model, relu_stats(model, inputs(model)))
    assert not result.modified
    assert any("read 0 at the border" in s.reason for s in result.skips)
