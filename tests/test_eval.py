"""evaluate() and `onnxrep eval`: accuracy against independent numpy, fidelity, CLI exits."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import Chain
from onnxrep.data import load_data
from onnxrep.cli import main
from onnxrep.errors import DataError, InputError
from onnxrep.evaluation import evaluate
from onnxrep.verify import metrics, run

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "models" / "mobileone_fmnist.onnx"
SHIPPED_EVAL = ROOT / "models" / "fmnist_eval.npz"


def classifier(classes=10, seed=0) -> onnx.ModelProto:
    return (Chain(channels=1, hw=(6, 6), seed=seed).conv(8).relu().gap().flatten()
            .gemm(classes, scale=2.0).build())


def perturbed(model: onnx.ModelProto, scale=0.3) -> onnx.ModelProto:
    """A copy with every Gemm weight nudged: close to the original, not equal."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(1)
    for i, t in enumerate(out.graph.initializer):
        w = numpy_helper.to_array(t)
        if w.ndim == 2:
            w = w + rng.normal(0, scale, w.shape).astype(w.dtype)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
    return out


MODEL = classifier()
RNG = np.random.default_rng(0)
X = RNG.standard_normal((50, 1, 6, 6)).astype(np.float32)
LOGITS = run(MODEL, {"input": X})[MODEL.graph.output[0].name]
# labels: the model's own top-1 on even samples, a random class on odd ones
LABELS = np.where(np.arange(50) % 2 == 0, LOGITS.argmax(1), RNG.integers(0, 10, 50))


def expected_topk(k: int) -> float:
    order = np.argsort(-LOGITS, axis=1)
    return float(np.mean([LABELS[i] in order[i, :k] for i in range(len(LABELS))]))


def test_topk_matches_independent_numpy():
    result = evaluate(MODEL, {"input": X, "labels": LABELS}, batch_size=7)
    assert result.samples == 50 and result.output == MODEL.graph.output[0].name
    assert result.top1 == pytest.approx(expected_topk(1)) and 0.5 <= result.top1 < 1
    assert result.top5 == pytest.approx(expected_topk(5)) and result.top5 > result.top1
    assert result.fidelity is None and result.skipped == ()
    assert result.seconds > 0 and result.samples_per_second > 0


def test_limit_and_a_dataset_argument():
    result = evaluate(MODEL, load_data({"input": X, "labels": LABELS}, MODEL, limit=10))
    assert result.samples == 10
    assert result.top1 == pytest.approx(np.mean(LOGITS[:10].argmax(1) == LABELS[:10]))


def test_fidelity_vs_itself_is_exact():
    result = evaluate(MODEL, X, reference=MODEL)
    (m,) = result.fidelity.values()
    assert m.max_abs == 0 and m.rel == 0 and m.sqnr_db == math.inf
    assert m.cosine == pytest.approx(1.0) and m.top1_agreement == 1.0
    assert result.accuracy == {} and result.skipped == ("accuracy: the data has no labels",)


def test_fidelity_over_batches_equals_whole_set_metrics(tmp_path):
    other = perturbed(MODEL)
    onnx.save(other, tmp_path / "other.onnx")
    result = evaluate(tmp_path / "other.onnx", X, reference=MODEL, batch_size=8)
    name = MODEL.graph.output[0].name
    whole = metrics(LOGITS, run(other, {"input": X})[name])
    got = result.fidelity[name]
    assert 0 < got.rel < 0.5 and 10 < got.sqnr_db < 80
    assert got.max_abs == pytest.approx(whole.max_abs, rel=1e-6)
    assert got.rel == pytest.approx(whole.rel, rel=1e-6)
    assert got.sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-6)
    assert got.cosine == pytest.approx(whole.cosine, rel=1e-9)
    assert got.top1_agreement == whole.top1_agreement < 1


def test_skips_say_why():
    result = evaluate(classifier(classes=4), {"input": X, "labels": LABELS % 4})
    assert set(result.accuracy) == {1} and result.skipped == ("top-5: trivial with 4 classes",)
    features = Chain(channels=1, hw=(6, 6)).conv(2).build()  # output [N, 2, 6, 6]
    result = evaluate(features, {"input": X, "labels": LABELS % 2})
    assert result.accuracy == {} and "is not [N, K] class scores" in result.skipped[0]


def test_bad_labels_and_reference():
    with pytest.raises(DataError, match="labels range 0..11 but output .* has 10 classes"):
        evaluate(MODEL, {"input": X, "labels": np.arange(50) % 12})
    other = Chain(channels=1, hw=(6, 6)).conv(2).build()
    other.graph.input[0].name = "x"
    other.graph.node[0].input[0] = "x"
    with pytest.raises(InputError, match="reference model's inputs \\(x\\) differ"):
        evaluate(MODEL, X, reference=other)


# ---- CLI -------------------------------------------------------------------------------------

def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse usage errors
        return exc.code


@pytest.fixture
def files(tmp_path):
    onnx.save(MODEL, tmp_path / "net.onnx")
    onnx.save(perturbed(MODEL), tmp_path / "ref.onnx")
    np.savez(tmp_path / "data.npz", input=X, labels=LABELS, meta=np.arange(3))
    return tmp_path


def test_cli_table_and_summary(files, capsys):
    before = [digest(files / n) for n in ("net.onnx", "data.npz")]
    assert main(["eval", str(files / "net.onnx"), "--data", str(files / "data.npz"),
                 "--reference", str(files / "ref.onnx"), "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "SQNR dB" in out and "not used from" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"net.onnx: top-1 {expected_topk(1):.4f} top-5 {expected_topk(5):.4f}"
                           " on 50 samples (")
    assert "; vs ref.onnx: SQNR" in last
    assert [digest(files / n) for n in ("net.onnx", "data.npz")] == before


def test_cli_json(files, capsys):
    assert main(["eval", str(files / "net.onnx"), "--data", str(files / "data.npz"),
                 "--limit", "20", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.eval" and doc["samples"] == 20
    assert doc["accuracy"]["top1"] == pytest.approx(np.mean(LOGITS[:20].argmax(1) == LABELS[:20]))
    assert doc["fidelity"] is None and doc["reference"] is None
    assert doc["unused_keys"] == ["meta"]


@pytest.mark.parametrize("extra", [
    [],  # wrong input name in the .npz
    ["--resize", "6x"],  # argparse: bad HxW
    ["--resize", "6x6"],  # image options for an .npz
])
def test_cli_bad_data_is_exit_2_one_line(files, capsys, extra):
    np.savez(files / "bad.npz", image=X)
    assert exit_code(["eval", str(files / "net.onnx"), "--data", str(files / "bad.npz"),
                      *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]


def test_cli_missing_data_and_nan(files, capsys):
    assert main(["eval", str(files / "net.onnx"), "--data", str(files / "none.npz")]) == 2
    bad = X.copy()
    bad[3, 0, 0, 0] = np.nan
    np.save(files / "nan.npy", bad)
    assert main(["eval", str(files / "net.onnx"), "--data", str(files / "nan.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("data not found: " + str(files / "none.npz"))
    assert err[-1].endswith("input 'input' sample 3 of " + str(files / "nan.npy") +
                            " contains NaN")


@pytest.mark.skipif(not (SHIPPED_MODEL.exists() and SHIPPED_EVAL.exists()),
                    reason="shipped model or eval set not built yet")
def test_shipped_model_on_shipped_eval_set():
    result = evaluate(SHIPPED_MODEL, SHIPPED_EVAL, batch_size=100)
    assert result.samples == 2000 and result.skipped == ()
    assert result.top1 > 0.85 and result.top5 > 0.99
