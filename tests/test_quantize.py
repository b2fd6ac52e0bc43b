"""onnxrep.quantize: config, QDQ structure, data errors, exclusion, report, bias correction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import (Chain, batch_for, conv_relu_conv, depthwise_chain, mobileone_like,
                    perturbed)
from onnxrep import verify
from onnxrep.cli import main
from onnxrep.errors import InputError
from onnxrep.ptq.quantizer import QuantizeConfig, quantize, quantize_with_details
from onnxrep.ptq.bias_correction import correct_biases
from onnxrep.ptq.sensitivity import layer_report
from onnxrep.ptq.quantizer import Quantizer, calibrate, prepare
from onnxrep.analysis.qdq import quantized_nodes

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"



def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    t = next((t for t in model.graph.initializer if t.name == name), None)
    return None if t is None else numpy_helper.to_array(t)


def _weight_source(qdq: onnx.ModelProto, node_name: str) -> np.ndarray | None:
    """The integer initializer behind a node's weight (DQ of a constant), else None."""
    node = next(n for n in qdq.graph.node if n.name == node_name)
    dq = _producer(qdq, node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return _init(qdq, dq.input[0])


def constant_weight_model() -> onnx.ModelProto:
    """Conv -> Relu -> Conv with every weight and bias in a Constant node (as Paddle exports)."""
    rng = np.random.default_rng(3)
    nodes = []
    for name, value in [("w1", rng.normal(0, 0.5, (8, 3, 3, 3))), ("b1", rng.normal(0, 0.1, 8)),
                        ("w2", rng.normal(0, 0.5, (4, 8, 1, 1))), ("b2", rng.normal(0, 0.1, 4))]:
        nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}",
                                      value=numpy_helper.from_array(value.astype(np.float32),
                                                                    name)))
    nodes += [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
              helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
              helper.make_node("Conv", ["r1", "w2", "b2"], ["out"], name="conv2")]
    graph = helper.make_graph(nodes, "constants",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                             ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                             ["N", 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---- config -----------------------------------------------------------------------------------

def test_config_defaults_and_tuples():
    c = QuantizeConfig(exclude=["a", "b"])
    assert c.exclude == ("a", "b")
    assert (c.activation_type, c.weight_type, c.method, c.per_channel) == (
        "uint8", "int8", "minmax", False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="kl"), "method"),
    (dict(activation_type="int16"), "activation_type"),
    (dict(weight_type="fp8"), "weight_type"),
    (dict(auto_exclude=-1), "auto_exclude"),
    (dict(max_drop=-0.5), "max_drop"),
    (dict(max_drop=float("nan")), "max_drop"),
    (dict(percentile=0), "percentile"),
    (dict(calibration_chunk=0), "calibration_chunk"),
    (dict(op_types=()), "op_types"),
    (dict(exclude=("",)), "exclude"),
])
def test_config_rejects(kwargs, words):
    with pytest.raises(ValueError, match=words):
        QuantizeConfig(**kwargs)


# ---- structure --------------------------------------------------------------------------------

def test_output_is_qdq_with_int8_weights_and_input_untouched():
    model = conv_relu_conv()
    before = model.SerializeToString()
    qdq = quantize(model, batch_for(model, 64))
    assert model.SerializeToString() == before
    ops = [n.op_type for n in qdq.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "Relu" not in ops  # folded into the Conv's output quantization
    for node in qdq.graph.node:
        if node.op_type == "Conv":
            w = _weight_source(qdq, node.name)
            assert w is not None and w.dtype == np.int8
    q_in = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear")
    assert _init(qdq, q_in.input[2]).dtype == np.uint8
    onnx.checker.check_model(qdq)


def test_constant_node_weights_quantized_as_weights():
    model = constant_weight_model()
    result = quantize_with_details(model, batch_for(model, 64), QuantizeConfig(optimize=False))
    assert any("Constant" in n for n in result.notes)
    for name in ("conv1", "conv2"):
        w = _weight_source(result.model, name)
        assert w is not None and w.dtype == np.int8, name
    feeds = {"input": batch_for(model, 16, seed=1)}
    assert verify.compare(model, result.model, feeds).sqnr_db > 25


def test_onnxruntime_fuses_integer_conv(tmp_path):
    """Conv(+Relu) becomes QLinearConv when onnxruntime optimizes the QDQ model, with no
    float op between a conv and its activation and no BatchNormalization."""
    c = Chain(channels=3, hw=(8, 8), seed=1).conv(8)
    c.node("BatchNormalization", [c.const(np.ones(8, np.float32) * 1.5),
                                  c.const(np.full(8, 0.1, np.float32)),
                                  c.const(np.zeros(8, np.float32)),
                                  c.const(np.ones(8, np.float32))])
    model = c.relu().conv(4).relu().build()
    qdq = quantize(model, batch_for(model, 64))
    assert "BatchNormalization" not in {n.op_type for n in qdq.graph.node}
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2, ops
    assert not {"Conv", "Relu", "BatchNormalization"} & set(ops), ops


def test_per_channel_converts_old_opset():
    model = Chain(channels=3, opset=12).conv(6).relu().conv(4).build()
    result = quantize_with_details(model, batch_for(model, 64), QuantizeConfig(per_channel=True))
    assert any("opset 12 converted to 13" in n for n in result.notes)
    onnx.checker.check_model(result.model)
    for conv in (n for n in result.model.graph.node if n.op_type == "Conv"):
        assert _weight_source(result.model, conv.name) is not None
    scales = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"
              and _init(result.model, n.input[0]) is not None
              and _init(result.model, n.input[0]).dtype == np.int8]
    assert any(_init(result.model, n.input[1]).size > 1 for n in scales)  # per-channel scales
    verify.run(result.model, {"input": batch_for(model, 4)})


def test_minmax_chunking_does_not_change_the_model():
    model = mobileone_like()
    x = batch_for(model, 96)
    a = quantize(model, x, QuantizeConfig(calibration_chunk=1, optimize=False))
    b = quantize(model, x, QuantizeConfig(calibration_chunk=50, optimize=False))
    feeds = {"input": x[:8]}
    ra, rb = verify.run(a, feeds), verify.run(b, feeds)
    assert all(np.array_equal(ra[k], rb[k]) for k in ra)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_stream_a_one_shot_source(method, monkeypatch):
    """The histogram calibrator sees at most ``calibration_chunk`` batches per call (what
    bounds its memory), and a generator is read once."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    calls = []
    original = HistogramCalibrater.collect_data

    def counting(self, reader):
        items = list(iter(reader.get_next, None))
        calls.append(len(items))
        return original(self, type(reader)(items))

    monkeypatch.setattr(HistogramCalibrater, "collect_data", counting)
    model = conv_relu_conv()
    x = batch_for(model, 44)
    batches = ({"input": x[i:i + 8]} for i in range(0, 44, 8))  # a generator: read once
    result = quantize_with_details(model, batches, QuantizeConfig(method=method,
                                                                  calibration_chunk=2),
                                   batch_size=8)
    assert result.calibration.samples == 44 and result.calibration.batches == 6
    assert max(calls) <= 2 and sum(calls) == 6  # never more than a chunk, every batch once
    assert verify.compare(model, result.model, {"input": x[:8]}).sqnr_db > 20


# ---- affine folding (prepare; the pass itself: test_fold_bn.py) -------------------------------

def test_prepare_folds_affine_ops_and_notes_the_bns_left():
    c = Chain(channels=3, seed=2).conv(4)
    c.node("Mul", [c.const(np.full((4, 1, 1), 2.0, np.float32))])
    bn = [c.const(v.astype(np.float32)) for v in (np.full(4, 1.5), np.full(4, 0.1),
                                                  np.zeros(4), np.ones(4))]
    c.node("BatchNormalization", bn).relu()
    c.node("BatchNormalization", bn, name="bn_after_relu")
    model = c.build()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    notes = prepare(work, per_channel=False)
    assert [n.op_type for n in work.graph.node] == ["Conv", "Relu", "BatchNormalization"]
    assert any(n.startswith("2 per-channel affine ops") for n in notes)
    assert any(n.startswith("BatchNormalization bn_after_relu left in float: its input comes "
                            "from Relu") for n in notes)
    feeds = {"input": batch_for(model, 2)}
    verify.check(verify.compare(model, work, feeds), 1e-5, "prepare")


# ---- data errors (CLI) ------------------------------------------------------------------------

@pytest.fixture
def toy(tmp_path):
    model = conv_relu_conv()
    path = tmp_path / "toy.onnx"
    onnx.save(model, str(path))
    x = batch_for(model, 40)
    np.savez(tmp_path / "calib.npz", input=x)
    return path, x


@pytest.mark.parametrize("kind", ["name", "shape", "dtype", "nan"])
def test_mismatched_calibration_data_exits_2(toy, tmp_path, capsys, kind):
    path, x = toy
    bad = tmp_path / f"bad_{kind}.npz"
    if kind == "name":
        np.savez(bad, image=x)
    elif kind == "shape":
        np.savez(bad, input=x[:, :2])
    elif kind == "dtype":
        np.savez(bad, input=np.full(x.shape, "a"))
    else:
        y = x.copy()
        y[7, 0, 1, 1] = np.nan
        np.savez(bad, input=y)
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    code = main(["quantize", str(path), "--calib", str(bad), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("onnxrep quantize: error:"), err
    assert not out.exists()
    assert path.read_bytes() == before
    assert list(tmp_path.glob("*.onnx")) == [path]


def test_cli_default_output_json_and_refusals(toy, tmp_path, capsys):
    path, _ = toy
    calib = str(tmp_path / "calib.npz")
    assert main(["quantize", str(path), "--calib", calib, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    out = tmp_path / "toy.int8.onnx"
    assert out.exists() and doc["output"] == str(out)
    assert doc["schema"] == "onnxrep.quantize" and doc["calibration"]["samples"] == 40
    assert set(doc["quantized_nodes"]) == {n.name for n in conv_relu_conv().graph.node
                                           if n.op_type == "Conv"}
    assert main(["quantize", str(path), "--calib", calib]) == 2  # exists, no --force
    assert main(["quantize", str(path), "--calib", calib, "-o", str(path), "--force"]) == 2
    assert main(["quantize", str(path), "--calib", calib, "-o", str(tmp_path / "x.onnx"),
                 "--exclude", "nope"]) == 2
    assert main(["quantize", str(path), "--calib", calib, "-o", str(tmp_path / "x.onnx"),
                 "--exclude", "auto:0"]) == 2
    assert "names no node" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_eval_report_and_auto_exclude(toy, tmp_path, capsys):
    path, x = toy
    labels = verify.run(conv_relu_conv(), {"input": x})
    np.savez(tmp_path / "eval.npz", input=x,
             labels=next(iter(labels.values())).reshape(len(x), -1)[:, :6].argmax(1))
    code = main(["quantize", str(path), "--calib", str(tmp_path / "calib.npz"), "--report",
                 "--eval", str(tmp_path / "eval.npz"), "--exclude", "auto", "-o",
                 str(tmp_path / "q.onnx")])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 kept in FP32" in out and "SQNR dB" in out and "weights only" in out


# ---- exclusion --------------------------------------------------------------------------------

def test_exclude_keeps_node_in_float():
    model = mobileone_like()
    target = next(n.name for n in model.graph.node if n.op_type == "Conv")
    result = quantize_with_details(model, batch_for(model, 64), QuantizeConfig(exclude=(target,)))
    assert result.excluded == (target,)
    assert target not in quantized_nodes(result.model)
    node = next(n for n in result.model.graph.node if n.name == target)
    assert _producer(result.model, node.input[1]) is None  # float initializer weight
    others = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name != target]
    assert set(others) <= set(quantized_nodes(result.model))


def test_auto_exclude_takes_the_worst_nodes_of_the_report():
    model = mobileone_like()
    x = batch_for(model, 64)
    result = quantize_with_details(model, x, QuantizeConfig(auto_exclude=2, optimize=False))
    worst = [e.node for e in result.report.layers[:2]]
    assert result.excluded == tuple(worst)
    assert not set(worst) & set(quantized_nodes(result.model))


def test_max_drop_raises_precision_until_the_budget_holds():
    model = mobileone_like()
    x = batch_for(model, 96)
    labels = verify.run(model, {"input": x})[model.graph.output[0].name].argmax(1)
    data = {"input": x, "labels": labels}
    loose = quantize_with_details(model, x, QuantizeConfig(max_drop=100.0, optimize=False),
                                  evaluation=data)
    assert loose.precision.met and loose.precision.steps == [] and loose.excluded == ()
    strict = quantize_with_details(model, x, QuantizeConfig(max_drop=0.0, optimize=False,
                                                            max_auto_exclude=3,
                                                            fallback=("fp32",)),
                                   evaluation=data)
    rec = strict.precision
    assert rec.unit == "pp" and len(rec.steps) <= 3
    assert all(s.after > s.before for s in rec.steps if s.choice == "fp32")
    assert strict.excluded == tuple(rec.nodes("fp32"))
    assert rec.met == (-rec.final <= 0.0)
    assert all(-s.before > 0.0 for s in rec.steps)  # every node tried while the drop was > 0
    with pytest.raises(Exception, match="max_drop needs"):
        quantize_with_details(model, x, QuantizeConfig(max_drop=1.0))


# ---- per-layer report -------------------------------------------------------------------------

def _prepared_pair(model, x, config=QuantizeConfig(optimize=False), tmp=None):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    prepare(work, per_channel=config.per_channel)
    ranges, _, kept = calibrate(work, _dataset(x, work), config, tmp)
    return work, Quantizer(config, ranges, tmp), kept


def _dataset(x, model):
    from onnxrep.data.readers import load_data

    return load_data(x, model, batch_size=16)


def test_report_worst_first_and_blames_weights(tmp_path):
    """FIELD_NOTES' mechanism: input channel 0 of a conv is always zero, and its weights are
    300x the others. FP32 does not care; per-tensor int8 rounds the other weights away, so the
    conv is the worst node and its weights (not its activations) are to blame."""
    c = Chain(channels=3, hw=(8, 8), seed=4).conv(8, dead=(0,)).relu()
    c.conv(8, name="outlier").relu().conv(4, name="last")
    model = c.build()
    conv = next(n for n in model.graph.node if n.name == "outlier")
    w = next(t for t in model.graph.initializer if t.name == conv.input[1])
    big = numpy_helper.to_array(w).copy()
    big[:, 0] *= 300.0
    w.CopyFrom(numpy_helper.from_array(big, w.name))
    work, quantizer, kept = _prepared_pair(model, batch_for(model, 64), tmp=tmp_path)
    report = layer_report(work, quantizer(work), kept)
    sqnrs = [e.sqnr_db for e in report.layers]
    assert sqnrs == sorted(sqnrs)
    assert report.layers[0].node == "outlier" and report.layers[0].cause == "weights"
    assert report.layers[0].weight_sqnr_db < report.layers[0].activation_sqnr_db
    assert {e.node for e in report.layers} == {n.name for n in model.graph.node
                                               if n.op_type == "Conv"}
    assert report.samples == 64 and not report.skips
    assert "outlier" in report.table().splitlines()[2]


def test_report_local_sqnr_matches_numpy_on_first_layer(tmp_path):
    """The local W+A number of the first conv equals a direct numpy computation on the QDQ
    model's own tensors (first conv: its input is the graph input, so local == cumulative)."""
    model = Chain(channels=2, hw=(6, 6), seed=5).conv(4, name="first").relu().conv(3).build()
    work, quantizer, kept = _prepared_pair(model, batch_for(model, 32), tmp=tmp_path)
    qdq = quantizer(work)
    report = layer_report(work, qdq, kept)
    first = next(e for e in report.layers if e.node == "first")
    assert first.sqnr_db == pytest.approx(first.cumulative_sqnr_db, abs=1e-6)


def test_report_refuses_a_float_model_that_was_not_quantized(tmp_path):
    """After CLE the original weights are rescaled: comparing them to the QDQ model would be
    meaningless, so the report refuses; the model written by --save-float is accepted."""
    model = mobileone_like()
    x = batch_for(model, 32)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    np.savez(tmp_path / "c.npz", input=x)
    assert main(["quantize", str(src), "--calib", str(tmp_path / "c.npz"), "-q",
                 "--save-float", str(tmp_path / "f.onnx")]) == 0
    qdq, fl = onnx.load(str(tmp_path / "m.int8.onnx")), onnx.load(str(tmp_path / "f.onnx"))
    batches = [{"input": x}]
    assert layer_report(fl, qdq, batches).layers
    with pytest.raises(InputError, match="not the one this QDQ model was quantized from"):
        layer_report(model, qdq, batches)


# ---- bias correction --------------------------------------------------------------------------

def test_bias_correction_reduces_mean_channel_error(tmp_path):
    model = depthwise_chain()
    x = batch_for(model, 128)
    work, quantizer, kept = _prepared_pair(model, x, tmp=tmp_path)
    plain = quantizer(work)
    corrected, record = correct_biases(work, quantizer, kept)
    assert record.layers and record.samples == 128 and record.kept
    assert record.sqnr_after > record.sqnr_before
    assert record.after < 0.5 * record.before
    for layer in record.layers:
        assert layer.after <= layer.before + 1e-6, layer
    # the corrected model is closer to FP32 on held-out data
    feeds = {"input": batch_for(model, 64, seed=9)}
    ref = verify.run(model, feeds)
    err = {name: np.abs(np.mean(next(iter(verify.run(m, feeds).values()))
                               - next(iter(ref.values())), axis=(0, 2, 3))).mean()
           for name, m in (("plain", plain), ("corrected", corrected))}
    assert err["corrected"] < err["plain"]


def test_bias_correction_discarded_when_output_sqnr_drops(tmp_path, monkeypatch):
    from onnxrep.ptq import bias_correction

    model = depthwise_chain()
    work, quantizer, kept = _prepared_pair(model, batch_for(model, 64), tmp=tmp_path)
    before = work.SerializeToString()
    plain = quantizer(work)
    sqnr = iter([30.0, 20.0])  # without, then with the correction
    monkeypatch.setattr(bias_correction, "_db", lambda signal, noise: next(sqnr))
    qdq, record = correct_biases(work, quantizer, kept)
    assert not record.kept and "discarded" in record.summary()
    assert work.SerializeToString() == before  # float model restored
    feeds = {"input": batch_for(model, 8, seed=3)}
    a, b = verify.run(plain, feeds), verify.run(qdq, feeds)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bias_correction_adds_missing_bias_and_skips_matmul(tmp_path):
    model = Chain(channels=3, seed=6).conv(6, bias=False).relu().flatten().matmul(5).build()
    work, quantizer, kept = _prepared_pair(model, batch_for(model, 64), tmp=tmp_path)
    _, record = correct_biases(work, quantizer, kept)
    conv = next(n for n in work.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2]
    assert [lay.node for lay in record.layers] == [conv.name]
    assert any("MatMul" in s.reason for s in record.skips)


# ---- shipped models ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mobileone_fmnist", "repvgg_fmnist"])
@pytest.mark.parametrize("per_channel, budget", [(False, 0.3), (True, 0.2)])
def test_shipped_model_int8_top1_within_budget(name, per_channel, budget):
    """The issue's acceptance on fmnist_eval.npz: per-tensor within 0.3 points of FP32,
    per-channel within 0.2 (about 5 s per case)."""
    from onnxrep.evaluation import evaluate

    path = MODELS / f"{name}.onnx"
    calib, data = MODELS / "fmnist_calib.npz", MODELS / "fmnist_eval.npz"
    if not (path.exists() and calib.exists() and data.exists()):
        pytest.skip("shipped models not present")
    model = onnx.load(str(path))
    qdq = quantize(model, str(calib), QuantizeConfig(per_channel=per_channel))
    fp32, int8 = evaluate(model, str(data)).top1, evaluate(qdq, str(data)).top1
    assert 100 * (fp32 - int8) <= budget, (fp32, int8)


def test_bias_correction_within_a_cache_budget_measures_later_layers_on_fewer_batches(
        monkeypatch):
    from onnxrep.ptq import bias_correction

    model = mobileone_like()
    x = batch_for(model, 64)
    full = quantize_with_details(model, {"input": x}, QuantizeConfig(), batch_size=8)
    monkeypatch.setattr(bias_correction, "CACHE_BYTES", 1)  # one batch left after the first layer
    tight = quantize_with_details(model, {"input": x}, QuantizeConfig(), batch_size=8)
    assert full.bias.later_samples is None and tight.bias.later_samples == 8
    assert "the later layers 8" in tight.bias.summary()
    assert verify.compare(model, tight.model, {"input": x}).sqnr_db > 15


def test_analysis_samples_default_to_a_budget_of_input_values():
    """Bias correction measures channel means over samples x positions: large inputs need
    fewer samples (2^21 input values, at least 8), small ones keep up to 256."""
    big = Chain(channels=3, hw=(128, 128), seed=2).conv(4, k=1, pad=0).relu().build()
    x = np.random.default_rng(2).standard_normal((50, 3, 128, 128)).astype(np.float32)
    config = QuantizeConfig(optimize=False)
    assert quantize_with_details(big, x, config, batch_size=1).bias.samples == 42
    huge = Chain(channels=3, hw=(512, 512), seed=2).conv(4, k=1, pad=0).relu().build()
    z = np.random.default_rng(2).standard_normal((10, 3, 512, 512)).astype(np.float32)
    assert quantize_with_details(huge, z, config, batch_size=1).bias.samples == 8
    small = conv_relu_conv()
    y = batch_for(small, 300)
    assert quantize_with_details(small, y, config, batch_size=20).bias.samples == 260
    asked = QuantizeConfig(optimize=False, analysis_samples=5)
    assert quantize_with_details(big, x, asked, batch_size=1).bias.samples == 5


def test_calibration_completes_the_passes_check_over_the_data(tmp_path):
    """The check over the data rides on the calibration run: it sees every batch, passes when
    the calibrated model is the reference and fails (naming the samples) when it is not."""
    from onnxrep.data import as_dataset
    from onnxrep.errors import VerificationError
    from onnxrep.verify.streaming import DataCheck

    model = mobileone_like()
    other = perturbed(model)
    data = as_dataset(batch_for(model, 40), model, batch_size=8)
    config = QuantizeConfig(optimize=False)
    same = DataCheck(model, data, rtol=1e-4, what="test")
    (tmp_path / "a").mkdir()
    calibrate(model, data, config, tmp_path / "a", same)
    assert same.batches == 5 and same.samples == 40
    (tmp_path / "b").mkdir()
    with pytest.raises(VerificationError, match="40 calibration samples"):
        calibrate(model, data, config, tmp_path / "b",
                  DataCheck(other, data, rtol=1e-4, what="test"))


def test_corrected_qdq_model_is_what_onnxruntime_writes_for_the_corrected_biases(tmp_path):
    model = depthwise_chain()
    work, quantizer, kept = _prepared_pair(model, batch_for(model, 64), tmp=tmp_path)
    qdq, record = correct_biases(work, quantizer, kept)
    assert record.kept
    by_ort = {t.name: numpy_helper.to_array(t) for t in quantizer(work).graph.initializer}
    mine = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    assert mine.keys() == by_ort.keys()
    for name, value in mine.items():  # int32 biases may differ by one rounding step
        tol = 1 if value.dtype == np.int32 else 0
        assert np.abs(value.astype(np.float64) - by_ort[name]).max(initial=0) <= tol, name
