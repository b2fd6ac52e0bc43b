import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphs import Chain, mobileone_like, perturbed
from onnxrep import verify
from onnxrep.data.readers import load_data
from onnxrep.analysis.statistics import (ChannelStats, Statistics, activation_ranges,
                                         collect_statistics, layer_outputs)
from onnxrep.verify.streaming import compare_on_data
from onnxrep.cli import main
from onnxrep.errors import DataError, VerificationError


def outputs_of(model, names, x):
    """The named tensors, from the model run with optimizations off (the numpy reference)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names
                              if n not in have)
    return verify.run(probe, {"input": x})


def assert_stats_close(got: ChannelStats, ref: ChannelStats, rtol=1e-6):
    assert got.count == ref.count
    scale = np.abs(ref.mean) + ref.std + 1e-30
    np.testing.assert_array_less(np.abs(got.mean - ref.mean) / scale, rtol)
    np.testing.assert_allclose(got.var, ref.var, rtol=rtol, atol=1e-30)
    np.testing.assert_array_equal(got.min, ref.min)
    np.testing.assert_array_equal(got.max, ref.max)


def shifted_model():
    """conv -> relu -> conv with a channel whose mean is 1e4 times its spread (a shifted
    variance must not cancel), then GAP -> Flatten -> Gemm (a rank-2 output)."""
    c = Chain(channels=3, hw=(8, 8), seed=1).conv(6).relu().conv(5, k=1, pad=0)
    c.gap().flatten().gemm(4)
    model = c.build()
    b = model.graph.initializer[1]
    arr = numpy_helper.to_array(b).copy()
    arr[2] = 3000.0
    b.CopyFrom(numpy_helper.from_array(arr, b.name))
    return model


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_statistics_equal_numpy(opset):
    c = Chain(channels=3, hw=(8, 8), seed=1, opset=opset).conv(6).relu().conv(5, k=1, pad=0)
    model = c.gap().flatten().gemm(4).build()
    x = np.random.default_rng(0).normal(2.0, 3.0, (70, 3, 8, 8)).astype(np.float32)
    names = layer_outputs(model) + ["input"]
    stats = collect_statistics(model, x, names, optimized=False, batch_size=16)
    assert stats.samples == 70 and stats.batches == 5 and not stats.skipped
    ref = outputs_of(model, names[:-1], x)
    for name in names:
        assert_stats_close(stats[name], ChannelStats.of(x if name == "input" else ref[name]))


def test_large_mean_small_spread_keeps_precision():
    model = shifted_model()
    x = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    names = layer_outputs(model)
    stats = collect_statistics(model, x, names, optimized=False, batch_size=8)
    ref = outputs_of(model, names, x)
    conv1 = ChannelStats.of(ref[names[0]])
    assert conv1.mean[2] / conv1.std[2] > 1000  # the badly conditioned case
    for name in names:
        assert_stats_close(stats[name], ChannelStats.of(ref[name]))


def test_fixed_batch_model_is_probed_with_whole_batches():
    c = Chain(channels=3, hw=(8, 8), seed=1, batch=4).conv(6).relu().conv(5, k=1, pad=0)
    model = c.build()
    x = np.random.default_rng(2).standard_normal((12, 3, 8, 8)).astype(np.float32)
    names = layer_outputs(model)
    stats = collect_statistics(model, x, names, optimized=False, batch_size=4)
    parts = [outputs_of(model, names, x[i:i + 4]) for i in range(0, 12, 4)]
    for name in names:
        ref = np.concatenate([p[name] for p in parts])
        assert_stats_close(stats[name], ChannelStats.of(ref))


def test_optimized_session_gives_the_same_statistics():
    model = mobileone_like()
    x = np.random.default_rng(2).standard_normal((40, 1, 16, 16)).astype(np.float32)
    fast = collect_statistics(model, x)
    plain = collect_statistics(model, x, optimized=False)
    for name in layer_outputs(model):
        np.testing.assert_allclose(fast[name].mean, plain[name].mean, rtol=1e-4,
                                   atol=1e-5 * plain[name].std.max())
        np.testing.assert_allclose(fast[name].var, plain[name].var, rtol=1e-4)


def test_shards_merge_to_one_pass():
    model = mobileone_like()
    x = np.random.default_rng(3).standard_normal((96, 1, 16, 16)).astype(np.float32)
    whole = collect_statistics(model, x, batch_size=32)
    parts = [collect_statistics(model, x[a:b], batch_size=32) for a, b in ((0, 40), (40, 96))]
    merged = parts[0].merge(parts[1])
    assert merged.samples == 96 and merged.batches == 4
    for name in whole.tensors:  # shards shift by their own first batch: float32 rounding
        assert_stats_close(merged[name], whole[name], rtol=1e-6)


def test_process_pool_equals_single_process():
    model = mobileone_like()
    x = np.random.default_rng(4).standard_normal((80, 1, 16, 16)).astype(np.float32)
    one = collect_statistics(model, x, batch_size=16, optimized=False)
    two = collect_statistics(model, x, batch_size=16, optimized=False, workers=2)
    assert two.samples == 80 and two.batches == 5
    for name in one.tensors:
        np.testing.assert_array_equal(two[name].mean, one[name].mean)
        np.testing.assert_array_equal(two[name].m2, one[name].m2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), cut=st.floats(0.05, 0.95), seed=st.integers(0, 2**16),
       offset=st.floats(-1e4, 1e4))
def test_chan_merge_is_exact_algebra(n, cut, seed, offset):
    x = np.random.default_rng(seed).standard_normal((n, 3, 4)) + offset
    k = max(1, min(n - 1, int(n * cut)))
    merged = ChannelStats.of(x[:k]).merge(ChannelStats.of(x[k:]))
    ref = ChannelStats.of(x)
    assert merged.count == ref.count
    np.testing.assert_allclose(merged.mean, ref.mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.var, ref.var, rtol=1e-8)
    np.testing.assert_array_equal(merged.min, ref.min)


def test_from_rows_matches_reference():
    rng = np.random.default_rng(5)
    x = rng.normal(50, 2, (7, 4, 30))
    shift = x.mean(axis=(0, 2)) + 0.3
    d = x - shift[None, :, None]
    got = ChannelStats.from_rows(d.sum(2), (d**2).sum(2), x.min(2), x.max(2), 30, shift)
    ref = ChannelStats.of(x)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-13)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-10)


def test_unmeasurable_tensors_are_skipped_with_reasons():
    c = Chain(channels=2, hw=(4, 4)).conv(3).relu()
    model = c.build()
    shape = helper.make_node("Shape", ["input"], ["shp"])
    model.graph.node.append(shape)
    model.graph.output.append(helper.make_tensor_value_info("shp", TensorProto.INT64, [4]))
    x = np.ones((4, 2, 4, 4), np.float32)
    stats = collect_statistics(model, x, ["nope", "shp", model.graph.initializer[0].name,
                                          model.graph.node[0].output[0]])
    assert "no node produces" in stats.skipped["nope"]
    assert "not a float tensor" in stats.skipped["shp"]
    assert "constant" in stats.skipped[model.graph.initializer[0].name]
    assert model.graph.node[0].output[0] in stats


def test_model_not_mutated_and_dataset_reused():
    model = mobileone_like()
    before = model.SerializeToString()
    x = np.random.default_rng(6).standard_normal((20, 1, 16, 16)).astype(np.float32)
    data = load_data(x, model, batch_size=8)
    a = collect_statistics(model, data)
    b = collect_statistics(model, data)
    assert model.SerializeToString() == before
    assert a.samples == b.samples == 20


def test_bad_data_is_a_data_error():
    model = mobileone_like()
    with pytest.raises(DataError):
        collect_statistics(model, {"wrong": np.zeros((2, 1, 16, 16), np.float32)})
    with pytest.raises(DataError):
        collect_statistics(model, np.zeros((2, 3, 16, 16), np.float32))


def test_statistics_merge_keeps_disjoint_tensors():
    a = Statistics({"x": ChannelStats.of(np.ones((2, 3)))}, 2, 1)
    b = Statistics({"y": ChannelStats.of(np.zeros((2, 2)))}, 2, 1, {"z": "why"})
    m = a.merge(b)
    assert set(m.tensors) == {"x", "y"} and m.skipped == {"z": "why"} and m.samples == 4
    with pytest.raises(DataError):
        a.merge(Statistics({"x": ChannelStats.of(np.ones((2, 4)))}))


def test_compare_on_data_streams_all_batches_and_checks():
    model = mobileone_like()
    other = perturbed(model)
    x = np.random.default_rng(7).standard_normal((50, 1, 16, 16)).astype(np.float32)
    same = compare_on_data(model, model, x, rtol=0.0)
    assert same.rel == 0.0
    with pytest.raises(VerificationError, match="50 calibration samples"):
        compare_on_data(model, other, x, rtol=1e-4, what="test")


def test_statistics_keep_the_model_outputs_within_the_budget():
    model = mobileone_like()
    x = np.random.default_rng(3).standard_normal((40, 1, 16, 16)).astype(np.float32)
    out = model.graph.output[0].name
    whole = verify.run(model, {"input": x})[out]
    per_batch = whole[:8].nbytes
    stats = collect_statistics(model, x, batch_size=8, keep_outputs=3 * per_batch + 1)
    assert [set(b) for b in stats.outputs] == [{out}] * 3  # the first three batches fit
    np.testing.assert_allclose(np.concatenate([b[out] for b in stats.outputs]), whole[:24],
                               rtol=1e-5, atol=1e-6)
    assert collect_statistics(model, x, batch_size=8).outputs == []


def test_compare_on_data_with_recorded_reference_outputs_equals_running_it():
    """Recorded reference outputs stand in for the batches they cover; the rest still run."""
    model = mobileone_like()
    other = perturbed(model)
    x = np.random.default_rng(7).standard_normal((50, 1, 16, 16)).astype(np.float32)
    data = load_data(x, model, batch_size=16)
    ran = compare_on_data(model, other, data)
    recorded = collect_statistics(model, data, keep_outputs=1 << 20).outputs[:2]
    assert len(recorded) == 2
    reused = compare_on_data(model, other, data, recorded=recorded)
    for name, m in ran.outputs.items():
        assert reused.outputs[name].sqnr_db == pytest.approx(m.sqnr_db, abs=1e-3)
        assert reused.outputs[name].max_abs == pytest.approx(m.max_abs, rel=1e-4)
    wrong = [{k: v + 1.0 for k, v in b.items()} for b in recorded]  # a recording is trusted
    assert compare_on_data(model, model, data, recorded=wrong).rel > 0


def test_activation_ranges_flag_coarse_channels():
    c = Chain(channels=2, hw=(6, 6), seed=8).conv(4, outliers={3: 200.0}, dead=(1,)).relu()
    model = c.conv(3).build()
    x = np.random.default_rng(8).standard_normal((30, 2, 6, 6)).astype(np.float32)
    rows = activation_ranges(model, collect_statistics(model, x))
    first, second = rows
    assert first.relu and first.lo == 0.0 and first.dead == 1 and first.channels == 4
    assert first.coarse >= 1 and first.ratio > 10  # the outlier channel sets the range
    assert not second.relu and second.lo < 0 < second.hi


def test_cli_inspect_with_calib(tmp_path, capsys):
    model = mobileone_like()
    src, calib = tmp_path / "net.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, input=np.random.default_rng(9).standard_normal((24, 1, 16, 16)).astype(
        np.float32))
    assert main(["inspect", str(src), "--calib", str(calib)]) == 0
    out = capsys.readouterr().out
    assert "activation ranges over 24 samples" in out and "median channel" in out
    assert "layer outputs leave a channel with fewer than 16 of 256 levels" in out
    assert main(["inspect", str(src), "--calib", str(calib), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    layers = doc["activations"]["layers"]
    assert doc["activations"]["samples"] == 24 and len(layers) == 8
    assert {"node", "ratio", "dead", "coarse", "median_width"} <= set(layers[0])
    assert main(["inspect", str(src), "--calib", str(tmp_path / "none.npz")]) == 2
