"""onnxrep.cpu, onnxrep.runtime, onnxrep.bench and `onnxrep bench` / `eval --runtime`.

No timed assertions: only the structure of what is measured (rounds, alternation, shapes,
statistics on given numbers) and that both runtimes compute the same outputs."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import Chain
from onnxrep import bench as B
from onnxrep.cli import main
from onnxrep.cpu import parse_cpuinfo
from onnxrep.errors import InputError
from onnxrep.runtime import session
from onnxrep.verify import run

ROOT = Path(__file__).resolve().parent.parent
REPVGG = ROOT / "models" / "repvgg_fmnist.onnx"
EVAL = ROOT / "models" / "fmnist_eval.npz"

CPUINFO_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""
CPUINFO_VNNI = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f "
                "avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16\n")


def tiny(seed=0, batch="N"):
    return (Chain(channels=1, hw=(8, 8), seed=seed, batch=batch).conv(4).relu().gap().flatten()
            .gemm(3).build())


@pytest.fixture
def two_models(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(tiny(0), a)
    onnx.save(tiny(1), b)
    return a, b


# ---- cpu --------------------------------------------------------------------------------------

def test_cpuinfo_flags_and_model():
    avx2 = parse_cpuinfo(CPUINFO_AVX2)
    assert avx2.model == "AMD EPYC 7B12"
    assert avx2.flags == {"AVX2": True, "AVX512F": False, "AVX512_VNNI": False,
                          "AVX_VNNI": False, "AMX": False}
    assert not avx2.vnni and "AVX2 yes" in avx2.line() and "AVX512_VNNI no" in avx2.line()
    xeon = parse_cpuinfo(CPUINFO_VNNI)
    assert xeon.vnni and all(xeon.flags.values())
    assert parse_cpuinfo("").flags == {} and "flags unknown" in parse_cpuinfo("").line()


# ---- statistics and alternation ---------------------------------------------------------------

def test_summarize_median_quartiles_min_max():
    t = B.summarize([5.0, 1.0, 3.0, 2.0, 4.0], batch=8)
    assert (t.median, t.q1, t.q3, t.min, t.max, t.calls) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert t.samples_per_second == pytest.approx(8 / 3.0)
    assert B.summarize([2.0], 1).q1 == 2.0


def test_alternate_warms_up_then_alternates_with_flipped_order():
    log = []
    clock = iter(range(1000)).__next__
    calls = [lambda: log.append("a"), lambda: log.append("b")]
    times = B.alternate(calls, rounds=3, warmup=2, clock=clock)
    assert log == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times] == [3, 3] and all(x == 1 for t in times for x in t)
    with pytest.raises(InputError):
        B.alternate(calls, rounds=0, warmup=0)


# ---- input shapes -----------------------------------------------------------------------------

def _symbolic_hw():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "H", "W"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_input_shapes_batch_overrides_and_errors():
    assert B.input_shapes(tiny(), 32) == {"input": (32, 1, 8, 8)}
    with pytest.raises(InputError, match="fixed batch dimension 1"):
        B.input_shapes(tiny(batch=1), 32)
    assert B.input_shapes(tiny(batch=1), 1) == {"input": (1, 1, 8, 8)}
    assert B.default_batches(tiny(batch=1)) == (1,) and B.default_batches(tiny()) == (1, 32)
    with pytest.raises(InputError, match="--input-shape x:"):
        B.input_shapes(_symbolic_hw(), 4)
    # the override gives H and W; its batch is replaced by --batch
    assert B.input_shapes(_symbolic_hw(), 4, {"x": (1, 1, 16, 24)}) == {"x": (4, 1, 16, 24)}
    with pytest.raises(InputError, match="does not fit"):
        B.input_shapes(_symbolic_hw(), 4, {"x": (1, 3, 16, 24)})
    with pytest.raises(InputError, match="unknown input"):
        B.input_shapes(tiny(), 4, {"nope": (1, 1, 8, 8)})


def test_bench_structure_two_models(two_models):
    result = B.bench([str(p) for p in two_models], batches=(1, 4), rounds=3, warmup=1,
                     threads=1)
    assert result.models == ("a.onnx", "b.onnx") and result.rounds == 3
    assert [r.batch for r in result.results] == [1, 4]
    for r in result.results:
        assert len(r.timings) == 2 and all(t.calls == 3 and t.min <= t.median <= t.max
                                           for t in r.timings)
        assert r.speedup == pytest.approx(r.timings[0].median / r.timings[1].median)
    assert result.results[1].shapes == {"input": (4, 1, 8, 8)}
    doc = json.loads(json.dumps(result.as_dict()))
    assert doc["results"][0]["timings"][0]["samples_per_second"] > 0


def test_bench_rejects_models_with_other_inputs(tmp_path, two_models):
    other = tmp_path / "other.onnx"
    onnx.save(_symbolic_hw(), other)
    with pytest.raises(InputError, match="differ"):
        B.bench([str(two_models[0]), str(other)], rounds=1)


# ---- runtime ----------------------------------------------------------------------------------

def test_onnxruntime_session_matches_verify_run():
    model = tiny()
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    sess = session(model, "onnxruntime", threads=1)
    (y,) = sess.run({"input": x})
    np.testing.assert_allclose(y, run(model, {"input": x})[model.graph.output[0].name],
                               rtol=1e-5, atol=1e-6)
    assert sess.output_names == [model.graph.output[0].name]
    with pytest.raises(InputError, match="unknown runtime"):
        session(model, "tensorrt")


def test_missing_openvino_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails
    with pytest.raises(InputError, match=r"onnxrep\[openvino\]"):
        session(tiny(), "openvino")
    assert main(["bench", str(REPVGG), "--runtime", "openvino", "--rounds", "1"]) == 2


def test_openvino_matches_onnxruntime_and_compiles_per_shape():
    pytest.importorskip("openvino")
    sess = session(str(REPVGG), "openvino", threads=1)
    ref = session(str(REPVGG), "onnxruntime", threads=1)
    rng = np.random.default_rng(0)
    for batch in (1, 5, 1):
        x = {"input": rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)}
        np.testing.assert_allclose(sess.run(x)[0], ref.run(x)[0], rtol=1e-4, atol=1e-4)
    assert len(sess._compiled) == 2
    assert sess.config["INFERENCE_PRECISION_HINT"] == "f32"


# ---- CLI --------------------------------------------------------------------------------------

def test_cli_bench_table_with_isa_line_and_speedup(two_models, capsys):
    a, b = map(str, two_models)
    assert main(["bench", a, b, "--batch", "1", "2", "--rounds", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU: " in out and "AVX512_VNNI" in out and "AVX2" in out
    assert "speed-up" in out and "median ms" in out and "IQR ms" in out
    rows = [ln for ln in out.splitlines() if ln.rstrip().endswith("x") and "b.onnx" in ln]
    assert len(rows) == 2


def test_cli_bench_json_document(two_models, capsys):
    assert main(["bench", str(two_models[0]), "--batch", "2", "--rounds", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "onnxrep.bench" and doc["runtime"] == "onnxruntime"
    assert set(doc["cpu"]["flags"]) >= {"AVX2", "AVX512F"} or doc["cpu"]["flags"] == {}
    (res,) = doc["results"]
    assert res["batch"] == 2 and res["speedup"] is None and len(res["timings"]) == 1


@pytest.mark.parametrize("argv, words", [
    (["missing.onnx"], "no such file"),
    (["{a}", "--batch", "0"], "--batch"),
    (["{a}", "--rounds", "0"], "--rounds"),
    (["{sym}"], "--input-shape x:"),
    (["{sym}", "--input-shape", "x:1x1"], "does not fit"),
    (["{a}", "{sym}"], "differ"),
])
def test_cli_bench_bad_input_exit_2_one_line(tmp_path, two_models, capsys, argv, words):
    sym = tmp_path / "sym.onnx"
    onnx.save(_symbolic_hw(), sym)
    argv = [x.format(a=two_models[0], sym=sym) for x in argv]
    assert main(["bench", *argv, "--rounds", "1"] if "--rounds" not in argv
                else ["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]


def test_cli_bench_openvino(two_models, capsys):
    pytest.importorskip("openvino")
    assert main(["bench", str(two_models[0]), str(two_models[1]), "--runtime", "openvino",
                 "--batch", "1", "--rounds", "2", "--threads", "1"]) == 0
    assert "openvino" in capsys.readouterr().out


def test_cli_eval_runtime_openvino_same_accuracy(capsys):
    pytest.importorskip("openvino")
    scores = {}
    for rt in ("onnxruntime", "openvino"):
        assert main(["eval", str(REPVGG), "--data", str(EVAL), "--limit", "256", "--json",
                     "--runtime", rt]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["runtime"] == rt
        scores[rt] = doc["accuracy"]["top1"]
    assert scores["openvino"] == pytest.approx(scores["onnxruntime"], abs=1 / 256)
