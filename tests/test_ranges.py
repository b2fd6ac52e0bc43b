"""--method auto (onnxrep.ptq.ranges) and mixed precision (onnxrep.ptq.mixed_precision)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import Chain, mobileone_like
from onnxrep import verify
from onnxrep.cli import main
from onnxrep.ptq import ranges
from onnxrep.ptq.quantizer import QuantizeConfig, _range_spec, quantize_with_details


def _conv():
    return Chain(channels=3, hw=(96, 96), opset=13).conv(4).relu().conv(4).build()


def _uniform(n=64, seed=0):
    """1.8M values: one outlier among them costs more as rounding noise of every other value
    (at 8 bits, when fewer than ~5 in a million) than as its own clipping error."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 96, 96)).astype(np.float32)


def _input_choice(result):
    return next(c for c in result.ranges.choices if c.tensor == "input")


def _qdq_input_scale(qdq):
    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    return float(inits[q.input[1]])


AUTO = dict(method="auto", optimize=False, bias_correction=False)


def test_minmax_is_kept_without_outliers():
    result = quantize_with_details(_conv(), _uniform(), QuantizeConfig(**AUTO))
    choice = _input_choice(result)
    assert choice.chosen.kind == "minmax"
    # every candidate is minmax here (deduplicated), or lost to it on the consumer
    assert not choice.scores or choice.consumers == 1


def test_a_clipped_range_wins_when_an_outlier_dominates():
    x = _uniform()
    x[0, 0, 0, 0] = 100.0
    config = QuantizeConfig(**AUTO)
    result = quantize_with_details(_conv(), x, config)
    choice = _input_choice(result)
    assert choice.chosen.kind != "minmax" and choice.chosen.hi < 10
    assert choice.scores[choice.chosen.kind] < 0.5 * choice.scores["minmax"]
    # exact: the QDQ model's scale is the one that was scored
    scale, _ = _range_spec(config).params(choice.chosen.lo, choice.chosen.hi)
    assert _qdq_input_scale(result.model) == pytest.approx(float(scale), rel=1e-6)
    # and it is better on the model's output than minmax ranges
    minmax = quantize_with_details(_conv(), x, QuantizeConfig(optimize=False,
                                                               bias_correction=False))
    ref = verify.run(_conv(), {"input": _uniform(seed=1)})
    def sqnr(m):
        out = verify.run(m, {"input": _uniform(seed=1)})
        return verify.compare_outputs(ref, out).sqnr_db
    assert sqnr(result.model) > sqnr(minmax.model) + 3


def test_candidates_from_a_histogram():
    bulk = np.random.default_rng(0).uniform(-1, 1, 100000)
    hist, edges = np.histogram(bulk, 2048, range=(-100, 100))
    hist = hist * 100  # 10M values in [-1, 1] ...
    hist[-1] += 1  # ... and one at 100
    cands = ranges.candidates(hist, edges, bulk.min(), 100.0, levels=255)
    kinds = [c.kind for c in cands]
    assert kinds[0] == "minmax" and "mse" in kinds
    mse = next(c for c in cands if c.kind == "mse")
    assert 0.9 < mse.hi < 10 and mse.lo < -0.9  # far below the outlier, not into the bulk


# ---- mixed precision ----------------------------------------------------------------------

def _mixed(min_sqnr, **kw):
    model = mobileone_like()
    x = np.random.default_rng(0).normal(0, 1, (32, 1, 16, 16)).astype(np.float32)
    return model, x, quantize_with_details(model, x, QuantizeConfig(
        optimize=False, min_sqnr=min_sqnr, **kw))


def test_int16_qdq_runs_and_beats_int8():
    model, x, result = _mixed(200.0, fallback=("int16",), max_auto_exclude=1)
    step = result.precision.steps[0]
    assert step.choice == "int16" and step.after > step.before
    opset = next(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 21
    types = {t.data_type for t in result.model.graph.initializer}
    assert onnx.TensorProto.UINT16 in types and onnx.TensorProto.INT16 in types
    out = verify.run(result.model, {"input": x})  # onnxruntime runs it
    assert np.all(np.isfinite(next(iter(out.values()))))
    assert not result.precision.met and result.excluded == ()


def test_min_sqnr_stops_as_soon_as_the_target_is_met():
    _, _, met = _mixed(-100.0)
    assert met.precision.met and met.precision.steps == []
    _, _, probe = _mixed(200.0, max_auto_exclude=3)
    gains = [s.after for s in probe.precision.steps if s.choice != "int8"]
    assert gains
    target = (probe.precision.start + gains[0]) / 2  # met by the first node that helps
    _, _, result = _mixed(target, max_auto_exclude=3)
    rec = result.precision
    assert rec.met and rec.final >= target
    assert [s.choice for s in rec.steps][-1] != "int8"
    assert all(s.before < target for s in rec.steps)
    assert len(rec.steps) <= len(probe.precision.steps)


def test_fp32_fallback_excludes_the_node():
    _, _, result = _mixed(200.0, fallback=("fp32",), max_auto_exclude=1)
    step = result.precision.steps[0]
    assert step.choice in ("fp32", "int8") and list(step.tried) == ["fp32"]
    assert result.excluded == ((step.node,) if step.choice == "fp32" else ())


@pytest.mark.parametrize("bad", [
    ["--min-sqnr", "nan"], ["--min-sqnr", "30", "--max-drop", "1", "--eval", "CALIB"],
    ["--min-sqnr", "30", "--fallback", "int16", "--target", "tensorrt"],
    ["--op-types", "auto", "Conv"]])
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, bad):
    model = tmp_path / "m.onnx"
    onnx.save(_conv(), model)
    calib = tmp_path / "c.npz"
    np.savez(calib, input=_uniform(8))
    args = [str(calib) if a == "CALIB" else a for a in bad]
    try:
        code = main(["quantize", str(model), "--calib", str(calib), "-o",
                     str(tmp_path / "o.onnx"), *args])
    except SystemExit as exc:  # argparse rejects the value itself
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert len([ln for ln in err if not ln.startswith("usage:")]) == 1
    assert not (tmp_path / "o.onnx").exists()
