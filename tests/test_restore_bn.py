import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from graphs import Chain, batch_for, mobileone_like
from onnxrep import verify
from onnxrep.analysis.statistics import ChannelStats
from onnxrep.cli import main
from onnxrep.errors import InputError
from onnxrep.ir.graph import GraphIndex
from onnxrep.passes import restore_bn as restore_module
from onnxrep.passes.fold_affine import FoldBatchNorm
from onnxrep.pipeline import restore_bn, restore_bn_with_details

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "mobileone_fmnist.onnx"
CALIB = ROOT / "models" / "fmnist_calib.npz"



def conv_outputs(model, x):
    """Every Conv output of ``model`` on ``x`` (optimizations off)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    out = verify.run(probe, {probe.graph.input[0].name: x})
    return {n: out[n] for n in names}


def bn_of(model, conv_output_name):
    index = GraphIndex(model.graph)
    (reader,) = index.readers(conv_output_name)
    bn = index.node(reader)
    assert bn.op_type == "BatchNormalization"
    return [index.const(n) for n in bn.input[1:5]]


def test_one_bn_per_conv_carrying_exact_statistics():
    model = mobileone_like()
    x = batch_for(model)
    restored = restore_bn(model, x)
    assert sum(n.op_type == "BatchNormalization" for n in restored.graph.node) == 7
    onnx.checker.check_model(restored)
    ref = conv_outputs(model, x)
    index = GraphIndex(restored.graph)
    for node in restored.graph.node:
        if node.op_type != "Conv":
            continue
        scale, bias, mean, var = bn_of(restored, node.output[0])
        bn_out = index.node(index.readers(node.output[0])[0]).output[0]
        s = ChannelStats.of(ref[bn_out])  # the BN output keeps the conv's old name
        np.testing.assert_allclose(mean, s.mean, rtol=1e-4, atol=1e-4 * s.std.max())
        np.testing.assert_allclose(var, s.var, rtol=1e-4)
        np.testing.assert_array_equal(bias, mean)
        np.testing.assert_allclose(scale, np.sqrt(var.astype(np.float64) + 1e-5), rtol=1e-7)


def test_restore_is_identity_and_fold_returns_the_original():
    model = mobileone_like()
    x = batch_for(model)
    before = model.SerializeToString()
    details = restore_bn_with_details(model, x)
    assert model.SerializeToString() == before
    assert details.comparison.rel <= 1e-5
    folded = onnx.ModelProto()
    folded.CopyFrom(details.model)
    assert FoldBatchNorm()(folded).summary.folded == 7
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]
    assert verify.compare(model, folded, {"input": x}).rel <= 1e-6
    a, b = GraphIndex(model.graph), GraphIndex(folded.graph)
    stats = details.stats
    for na, nb in zip(model.graph.node, folded.graph.node):
        if na.op_type != "Conv":
            continue
        wa, wb = a.const(na.input[1]), b.const(nb.input[1])
        np.testing.assert_allclose(wb, wa, rtol=1e-6, atol=0)
        s = stats[na.output[0]]  # the bias comes back within float32 rounding of the mean
        scale = np.abs(s.mean) + s.std
        assert np.all(np.abs(b.const(nb.input[2]) - a.const(na.input[2])) <= 1e-6 * scale)


def test_layers_select_and_validate():
    model = mobileone_like()
    x = batch_for(model, 16)
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    one = restore_bn(model, x, layers=[names[2]])
    bns = [n for n in one.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1 and bns[0].input[0].startswith(model.graph.node[4].output[0])
    with pytest.raises(InputError, match="no node named 'nope'"):
        restore_bn(model, x, layers=["nope"])
    relu = next(n.name for n in model.graph.node if n.op_type == "Relu")
    with pytest.raises(InputError, match="not a Conv"):
        restore_bn(model, x, layers=[relu])


def test_conv_already_followed_by_bn_is_skipped():
    model = mobileone_like()
    x = batch_for(model, 16)
    once = restore_bn(model, x)
    twice = restore_bn_with_details(once, x)
    assert not twice.result.changes
    assert all("already followed" in s.reason for s in twice.result.skips)


def test_unnamed_nodes_and_constant_channels():
    c = Chain(channels=2, hw=(6, 6)).conv(4, dead=(1,)).relu()
    model = c.build()
    for node in model.graph.node:
        node.name = ""
    x = batch_for(model, 10)
    details = restore_bn_with_details(model, x, layers=["Conv#0"])
    assert "1 constant" in details.result.changes[0].detail
    assert details.comparison.rel <= 1e-6


@settings(max_examples=25, deadline=None)
@given(cin=st.sampled_from([1, 2, 4]), cout=st.sampled_from([2, 4, 8]), k=st.sampled_from([1, 3]),
       depthwise=st.booleans(), bias=st.booleans(), shift=st.floats(-50, 50),
       seed=st.integers(0, 1000))
def test_restore_property(cin, cout, k, depthwise, bias, shift, seed):
    group = 1
    if depthwise:
        cin = group = cout
    c = Chain(channels=cin, hw=(5, 5), seed=seed).conv(cout, k=k, group=group, bias=bias)
    model = c.relu().conv(3, k=1, pad=0).build()
    x = batch_for(model, 12, seed) + np.float32(shift)
    details = restore_bn_with_details(model, x)
    assert details.comparison.rel <= 1e-5
    folded = onnx.ModelProto()
    folded.CopyFrom(details.model)
    FoldBatchNorm()(folded)
    assert verify.compare(model, folded, {"input": x}).rel <= 1e-5


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path):
    model = mobileone_like()
    src = tmp_path / "net.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=batch_for(model, 40))
    return src, calib


def test_cli_restore_bn_writes_default_output(files, capsys):
    src, calib = files
    before = digest(src)
    assert main(["restore-bn", str(src), "--calib", str(calib)]) == 0
    out = capsys.readouterr().out
    assert "restored 7 BatchNormalization" in out and "verified on the calibration data" in out
    written = src.parent / "net.bn.onnx"
    assert written.exists() and digest(src) == before
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(written).graph.node) == 7
    assert main(["restore-bn", str(src), "--calib", str(calib), "--json", "--force",
                 "--layers", "Conv4,Conv10"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.restore-bn" and doc["samples"] == 40
    assert [layer["conv"] for layer in doc["layers"]] == ["Conv4", "Conv10"]
    assert len(doc["layers"][0]["mean"]) == 16 and doc["verification"]


def test_cli_restore_bn_errors(files, capsys, monkeypatch):
    src, calib = files
    out = src.parent / "net.bn.onnx"
    with pytest.raises(SystemExit) as usage:  # --calib is required: argparse exits 2
        main(["restore-bn", str(src)])
    assert usage.value.code == 2
    assert main(["restore-bn", str(src), "--calib", str(src.parent / "none.npz")]) == 2
    assert main(["restore-bn", str(src), "--calib", str(calib), "--layers", "nope"]) == 2
    bad = src.parent / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 1, 16, 16), np.float32))
    assert main(["restore-bn", str(src), "--calib", str(bad)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no node named 'nope'" in err

    def wrong(s, eps, dtype):  # a broken restore must fail verification and write nothing
        scale, bias, mean, var = real(s, eps, dtype)
        return [scale * 2, bias, mean, var]

    real = restore_module._bn_params
    monkeypatch.setattr(restore_module, "_bn_params", wrong)
    assert main(["restore-bn", str(src), "--calib", str(calib)]) == 3
    assert "relative error" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not (SHIPPED.exists() and CALIB.exists()), reason="shipped model absent")
def test_shipped_mobileone_restore_matches_numpy_statistics():
    model = onnx.load(SHIPPED)
    x = np.load(CALIB)["input"]
    details = restore_bn_with_details(model, x)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    bns = [n for n in details.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == len(convs) and not details.result.skips
    assert details.comparison.rel <= 1e-5
    ref = conv_outputs(model, x)
    for conv in convs:
        scale, bias, mean, var = bn_of(details.model, [n for n in details.model.graph.node
                                                       if n.name == conv.name][0].output[0])
        s = ChannelStats.of(ref[conv.output[0]])
        np.testing.assert_allclose(mean, s.mean, rtol=1e-4, atol=1e-4 * (s.std.max() + 1e-12))
        np.testing.assert_allclose(var, s.var, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("opset", [11, 14, 21])
def test_restore_and_fold_across_opsets(opset):
    model = Chain(channels=2, hw=(6, 6), opset=opset).conv(4).relu().conv(3, group=1).build()
    x = batch_for(model, 20)
    details = restore_bn_with_details(model, x)
    onnx.checker.check_model(details.model)
    assert details.result.summary.restored == 2 and details.comparison.rel <= 1e-6
    folded = onnx.ModelProto()
    folded.CopyFrom(details.model)
    FoldBatchNorm()(folded)
    assert verify.compare(model, folded, {"input": x}).rel <= 1e-6
