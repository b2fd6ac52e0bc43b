import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphs import mobileone_like
from onnxrep import verify
from onnxrep.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(mobileone_like(), path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_writes_default_output_and_prints_table(model_path, capsys):
    before = digest(model_path)
    assert main(["optimize", str(model_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert (model_path.parent / "net.opt.onnx").exists()
    assert "spread" in out and "verified: max rel err" in out and "net.opt.onnx" in out
    assert digest(model_path) == before


def test_optimize_json_document(model_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(model_path.parent / "o.onnx"),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.optimize" and doc["schema_version"] == 1
    assert doc["passes"][0]["name"] == "equalize" and doc["passes"][0]["changes"]
    worst_before = max(layer["before"]["spread"] for layer in doc["layers"])
    worst_after = max(layer["after"]["spread"] for layer in doc["layers"])
    assert worst_after * 10 < worst_before
    assert doc["verification"]["t49"]["rel"] < 1e-4


@pytest.mark.parametrize("content", [b"", b"not onnx at all", "truncated"])
def test_bad_input_is_exit_2_one_line_nothing_written(tmp_path, capsys, content, model_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model_path.read_bytes()[:200] if content == "truncated" else content)
    before = digest(bad)
    assert main(["optimize", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad.opt.onnx").exists()
    assert digest(bad) == before


def test_missing_file_and_output_equal_to_input(model_path, capsys):
    assert main(["optimize", str(model_path.parent / "nope.onnx")]) == 2
    assert main(["optimize", str(model_path), "-o", str(model_path), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no such file" in err[0] and "is the input" in err[1]


def test_existing_output_needs_force(model_path):
    out = model_path.parent / "o.onnx"
    out.write_bytes(b"keep")
    assert main(["optimize", str(model_path), "-o", str(out), "-q"]) == 2
    assert out.read_bytes() == b"keep"
    assert main(["optimize", str(model_path), "-o", str(out), "-q", "--force"]) == 0
    onnx.load(out)


def test_verification_failure_is_exit_3_and_nothing_written(model_path, capsys):
    assert main(["optimize", str(model_path), "--rtol", "0", "--strict", "-q"]) == 3
    err = capsys.readouterr().err
    assert "would have needed --rtol" in err
    assert not (model_path.parent / "net.opt.onnx").exists()


def test_bad_usage_is_exit_2(model_path, capsys):
    for bad in (["--iterations", "-1"], ["--bogus"]):
        with pytest.raises(SystemExit) as exc:
            main(["optimize", str(model_path), *bad])
        assert exc.value.code == 2
    assert main(["optimize", str(model_path), "--input-shape", "input:1xAx2"]) == 2


def test_input_shape_override(model_path, capsys):
    assert main(["optimize", str(model_path), "--input-shape", "input:3x1x16x16", "-q"]) == 0
    assert main(["optimize", str(model_path), "--input-shape", "other:1x1x16x16", "-q",
                 "--force"]) == 2
    assert "unknown input" in capsys.readouterr().err


def test_inspect_table_json_and_plot(model_path, tmp_path, capsys):
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "OUTLIER" in out and "CLE pairs (7)" in out and "graph output" in out
    opt = tmp_path / "opt.onnx"
    assert main(["optimize", str(model_path), "-o", str(opt), "-q"]) == 0
    capsys.readouterr()
    plot = tmp_path / "ranges.png"
    assert main(["inspect", str(model_path), str(opt), "--json", "--plot", str(plot)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.inspect" and len(doc["pairs"]) == 7
    assert any(layer["outlier"] for layer in doc["layers"])
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_python_dash_m_entry_point(model_path):
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "inspect", str(model_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema"] == "onnxrep.inspect"


def test_a_failing_pass_rolls_back_its_units_by_default(model_path, capsys, tmp_path):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(model_path), "--rtol", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rolled back: pass 'equalize' changed the model's outputs" in printed
    assert verify.compare(onnx.load(model_path), onnx.load(out),
                          verify.random_inputs(onnx.load(model_path))).rel == 0


def test_image_options_apply_to_every_data_flag(tmp_path):
    """--calib (and --eval) folders take the same image options as eval's --data."""
    image = pytest.importorskip("PIL.Image")
    from graphs import Chain

    model = Chain(channels=1, hw=(6, 6), seed=0).conv(4).relu().gap().flatten().gemm(3).build()
    onnx.save(model, tmp_path / "m.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        image.fromarray(rng.integers(0, 255, (9, 9), dtype="uint8")).save(folder / f"{k}.png")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(folder), "--resize", "6x6",
                 "--grayscale", "--mean", "0.5", "--no-bias-correction", "-o", str(out),
                 "-q"]) == 0
    assert out.exists()


def test_optimize_judges_layers_against_the_bn_folded_input(tmp_path, capsys):
    """A BN that scales one channel 20x makes the folded conv an outlier layer; that is
    folding (every INT8 flow folds BN), so the table's "before" is the folded input (flagged
    `*`, not `v`), while the JSON keeps the input, the folded and the output statistics."""
    from graphs import Chain

    c = Chain(channels=3, hw=(8, 8), seed=0).conv(8)
    gamma = np.ones(8, np.float32)
    gamma[2] = 20.0
    c.node("BatchNormalization", [c.const(v, "bn") for v in (
        gamma, np.zeros(8, np.float32), np.zeros(8, np.float32), np.ones(8, np.float32))])
    path = tmp_path / "bn.onnx"
    onnx.save(c.relu().conv(4).build(), path)
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["layers"][0]
    assert first["folded"]["max_abs"] > 10 * first["before"]["max_abs"]
    assert first["folded"]["channel_sqnr_db"] < first["before"]["channel_sqnr_db"] - 3
    assert first["after"]["channel_sqnr_db"] > first["folded"]["channel_sqnr_db"] + 3
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--force"]) == 0
    out = capsys.readouterr().out
    assert "before = the deploy form" in out and " folded -> " in out
    row = next(line for line in out.splitlines() if line.startswith("Conv"))
    assert f"{first['folded']['max_abs']:.3g} ->" in row and row.rstrip().endswith("*")


def test_optimize_without_data_points_to_calibration_when_a_layer_fell(model_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(model_path.parent / "o.onnx")]) == 0
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.rstrip().endswith("v")]
    assert flagged and f"note: {len(flagged)} layer(s) lost per-channel SQNR" in out
    assert "--calib DATA" in out
