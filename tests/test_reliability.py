"""Bad input and hostile paths: the tool never damages a file, and every refusal is exit 2 with
one line on stderr (no traceback), nothing written, the input untouched."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import socket
import stat
import threading
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import Chain, batch_for, mobileone_like
from onnxrep.cli import main
from onnxrep.ir import model as model_io


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(mobileone_like(), path)
    return path


@pytest.fixture
def calib_path(tmp_path, model_path):
    path = tmp_path / "calib.npz"
    np.savez(path, input=batch_for(onnx.load(model_path), 16))
    return path


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---- 1. output paths that are the input or a file it reads ------------------------------------

def test_output_refuses_the_inputs_external_data(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(mobileone_like(), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    data = tmp_path / "m.onnx.data"
    before = digest(src), digest(data)
    assert main(["optimize", str(src), "-o", str(data), "--force", "-q"]) == 2
    assert "external data" in one_line(capsys)
    # the output's own <out>.data must not be the input's data file either
    assert main(["optimize", str(src), "-o", str(tmp_path / "m.onnx"), "--force", "-q"]) == 2
    assert "is the input" in one_line(capsys)
    renamed = tmp_path / "w.onnx"
    onnx.save(mobileone_like(), renamed, save_as_external_data=True,
              all_tensors_to_one_file=True, location="x.onnx.data", size_threshold=0)
    assert main(["optimize", str(renamed), "-o", str(tmp_path / "x.onnx"), "--force",
                 "-q"]) == 2
    assert "external data" in one_line(capsys)
    assert (digest(src), digest(data)) == before
    # through a symlink to the data file too
    link = tmp_path / "link.onnx"
    link.symlink_to(data)
    assert main(["optimize", str(src), "-o", str(link), "--force", "-q"]) == 2
    one_line(capsys)
    assert (digest(src), digest(data)) == before
    assert main(["optimize", str(src), "-o", str(tmp_path / "ok.onnx"), "-q"]) == 0


# ---- 2. devices, FIFOs, sockets, directories as outputs -----------------------------------------

def _special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    files = [fifo, sock_path]
    try:
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        files.append(dev)
    except (PermissionError, OSError):
        pass
    return files, sock


def test_output_refuses_devices_fifos_and_sockets(model_path, tmp_path, capsys):
    files, sock = _special_files(tmp_path)
    try:
        for f in files:
            mode = os.stat(f).st_mode
            assert main(["optimize", str(model_path), "-o", str(f), "--force", "-q"]) == 2
            assert "not a regular file" in one_line(capsys)
            assert os.stat(f).st_mode == mode
        assert not leftovers(tmp_path)
    finally:
        sock.close()


def test_dev_null_is_refused_and_left_alone(model_path, capsys):
    before = os.stat("/dev/null")
    assert main(["optimize", str(model_path), "-o", "/dev/null", "--force", "-q"]) == 2
    assert "character device" in one_line(capsys)
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_trailing_slash_means_a_directory(model_path, tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["optimize", str(model_path), "-o", f"{out}/", "-q"]) == 0
    assert (out / "net.opt.onnx").is_file()
    # an existing directory without the slash: the same
    assert main(["optimize", str(model_path), "-o", str(out), "-q", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["net.opt.onnx"]


# ---- 3. disk full and permission denied at the write boundary ---------------------------------

class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def _full_disk_open(monkeypatch):
    real = builtins.open

    def fake(file, mode="r", *a, **kw):
        f = real(file, mode, *a, **kw)
        return _FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(model_io, "open", fake, raising=False)


def _deny_rename(monkeypatch, exc):
    def fake(src, dst):
        raise exc

    monkeypatch.setattr(model_io.os, "replace", fake)


@pytest.mark.parametrize("failure", ["enospc", "bare-enospc", "eacces"])
def test_disk_full_or_denied_is_exit_2_and_leaves_nothing(model_path, calib_path, tmp_path,
                                                          capsys, monkeypatch, failure):
    if failure == "enospc":
        _full_disk_open(monkeypatch)
        words = "no space left on device"
    elif failure == "bare-enospc":
        _deny_rename(monkeypatch, OSError(errno.ENOSPC))
        words = "no space left on device"
    else:
        _deny_rename(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
        words = "permission denied"
    before = digest(model_path)
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["optimize", str(model_path), "-o", str(out / "o.onnx")],
                 ["quantize", str(model_path), "--calib", str(calib_path), "-o",
                  str(out / "q.onnx"), "--no-bias-correction"]):
        assert main([*argv, "-q"]) == 2
        line = one_line(capsys)
        assert line.endswith(words) and "cannot write" in line, line
        assert list(out.iterdir()) == []
    if failure != "enospc":  # matplotlib writes with its own open; the rename is ours
        assert main(["inspect", str(model_path), "--plot", str(out / "p.png")]) == 2
        assert "cannot write" in one_line(capsys)
        assert list(out.iterdir()) == []
    assert digest(model_path) == before


# ---- 5. FIFOs as model or data ----------------------------------------------------------------

def _returns(fn, timeout=60):
    result = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung on a FIFO"
    return result[0]


def test_fifo_model_or_data_is_refused_without_opening(model_path, calib_path, tmp_path,
                                                       capsys):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    for command in (["optimize", str(fifo)], ["inspect", str(fifo)],
                    ["quantize", str(fifo), "--calib", str(fifo)],
                    ["eval", str(fifo), "--data", str(fifo)]):
        assert _returns(lambda: main([*command, "-q"])) == 2
        assert "FIFO" in one_line(capsys)
    data = tmp_path / "pipe.npz"
    os.mkfifo(data)
    for command in (["optimize", str(model_path), "--calib", str(data)],
                    ["eval", str(model_path), "--data", str(data)],
                    ["eval", str(model_path), "--data", str(calib_path), "--reference",
                     str(fifo)]):
        assert _returns(lambda: main([*command, "-q"])) == 2
        assert "FIFO" in one_line(capsys)


# ---- 7. inspect --plot ------------------------------------------------------------------------

def test_inspect_plot_refusals(model_path, tmp_path, capsys, monkeypatch):
    no_conv = tmp_path / "relu.onnx"
    onnx.save(Chain().relu().build(), no_conv)
    assert main(["inspect", str(no_conv), "--plot", str(tmp_path / "p.png")]) == 2
    assert "nothing to plot" in one_line(capsys)
    assert main(["inspect", str(model_path), "--plot", str(tmp_path / "p.xyz")]) == 2
    assert "unknown plot format" in one_line(capsys)
    assert main(["inspect", str(model_path), "--plot", str(model_path)]) == 2
    one_line(capsys)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert main(["inspect", str(model_path), "--plot", str(tmp_path / "p.png")]) == 2
    assert "onnxrep[plot]" in one_line(capsys)
    assert not list(tmp_path.glob("p.*")) and not leftovers(tmp_path)


# ---- 8. numeric options -----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["optimize", "--rtol", "-1"], ["optimize", "--rtol", "nan"], ["optimize", "--max-scale", "nan"],
    ["optimize", "--max-scale", "0.5"], ["optimize", "--tolerance", "nan"],
    ["optimize", "--threshold", "nan"], ["optimize", "--threshold", "inf"],
    ["optimize", "--iterations", "-3"], ["optimize", "--batch-size", "0"],
    ["optimize", "--calib-limit", "-1"], ["optimize", "--input-range=nan,1"],
    ["optimize", "--input-range=1,-1"],
    ["quantize", "--calib", "x.npz", "--percentile", "nan"],
    ["quantize", "--calib", "x.npz", "--percentile", "101"],
    ["quantize", "--calib", "x.npz", "--max-drop", "-1"],
    ["quantize", "--calib", "x.npz", "--rtol", "inf"],
    ["quantize", "--calib", "x.npz", "--calibration-chunk", "0"],
    ["quantize", "--calib", "x.npz", "--analysis-samples", "0"],
    ["eval", "--data", "x.npz", "--scale", "nan"], ["eval", "--data", "x.npz", "--mean", "nan"],
    ["eval", "--data", "x.npz", "--limit", "0"],
    ["restore-bn", "--calib", "x.npz", "--eps", "-1"],
    ["restore-bn", "--calib", "x.npz", "--rtol", "nan"],
    ["restore-bn", "--calib", "x.npz", "--workers", "0"],
    ["fold-bn", "--rtol", "nan"],
    ["qat", "--data", "x.npz", "--lr", "nan"], ["qat", "--data", "x.npz", "--lr", "0"],
    ["qat", "--data", "x.npz", "--momentum", "1"], ["qat", "--data", "x.npz", "--epochs", "0"],
    ["qat", "--data", "x.npz", "--rtol", "-1"], ["qat", "--data", "x.npz", "--threads", "0"],
])
def test_numeric_options_are_checked_at_parse_time(model_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([argv[0], str(model_path), *argv[1:]])
    assert exc.value.code == 2
    line = one_line(capsys)
    assert "argument" in line and "--" in line


# ---- 6. corrupted calibration files -----------------------------------------------------------

def _corrupt(path, offset):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_corrupted_npz_and_image_bombs_are_exit_2(model_path, tmp_path, capsys, monkeypatch):
    x = batch_for(onnx.load(model_path), 40)
    stored = tmp_path / "stored.npz"
    np.savez(stored, input=x)
    _corrupt(stored, stored.stat().st_size // 2)  # inside the array's bytes
    deflated = tmp_path / "deflated.npz"
    np.savez_compressed(deflated, input=x)
    _corrupt(deflated, 80)
    garbled = tmp_path / "garbled.npz"  # a .npy header that does not tokenize
    import io
    buf = io.BytesIO()
    np.save(buf, x)
    raw = buf.getvalue().replace(b"(40, 1, 16, 16)", b"(40, 1, 16, 16 ")
    with zipfile.ZipFile(garbled, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("input.npy", raw)
    for bad in (stored, deflated, garbled):
        assert main(["optimize", str(model_path), "--calib", str(bad), "-q"]) == 2
        line = one_line(capsys)
        assert str(bad) in line, line
    assert not (tmp_path / "net.opt.onnx").exists()
    # the CRC is checked once per member, not once per pass
    from onnxrep.data import readers
    good = tmp_path / "good.npz"
    np.savez(good, input=x)
    calls = []
    real = readers._NpzMember.verify
    monkeypatch.setattr(readers._NpzMember, "verify",
                        lambda self: calls.append(self._verified) or real(self))
    data = readers.load_data(good, onnx.load(model_path), batch_size=8)
    for _ in range(3):
        assert sum(len(b["input"]) for b in data.batches()) == 40
    assert calls.count(False) == 1


def test_decompression_bomb_image_is_exit_2(tmp_path, capsys, monkeypatch):
    from PIL import Image

    model = Chain(channels=1, hw=(8, 8)).conv(4).build()
    onnx.save(model, tmp_path / "m.onnx")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (8, 8)).save(images / "a.png")
    Image.new("L", (64, 64)).save(images / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x: DecompressionBombError
    assert main(["optimize", str(tmp_path / "m.onnx"), "--calib", str(images), "-q"]) == 2
    line = one_line(capsys)
    assert "bomb.png" in line


# ---- 4. non-finite weights and a model that already outputs inf/NaN --------------------------

def _nan_weight_model():
    m = Chain().conv(4, name="conv1").relu().conv(4, name="conv2").relu().conv(
        4, name="conv3").build()
    w = next(t for t in m.graph.initializer if t.name == m.graph.node[4].input[1])
    a = numpy_helper.to_array(w).copy()
    a.flat[0] = a.flat[5] = np.nan
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    return m, w.name


def _bn_var0_model():
    c = Chain().conv(4, name="conv1")
    z, o = np.zeros(4, np.float32), np.ones(4, np.float32)
    c.node("BatchNormalization", [c.const(o), c.const(z), c.const(z), c.const(z)], epsilon=0.0)
    return c.relu().conv(4).build()


def _div_by_zero_on_some_data():
    """Finite on the verification inputs, NaN (0/0) on one calibration sample only."""
    c = Chain(channels=1, hw=(4, 4)).conv(2, k=1)
    c.node("Div", [c.tensor])  # x / x: NaN where x == 0
    return c.build()


def test_nan_weights_name_the_weight_and_node(tmp_path, capsys, recwarn):
    model, name = _nan_weight_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", input=batch_for(model, 8))
    for extra in ([], ["--calib", str(tmp_path / "c.npz")]):
        assert main(["optimize", str(tmp_path / "m.onnx"), "-q", *extra]) == 2
        line = one_line(capsys)
        assert f"weight '{name}' of node 'conv3' holds 2 NaN values" in line
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"),
                 "--no-optimize", "-q"]) == 2
    assert "2 NaN" in one_line(capsys)
    from onnxrep import errors, optimize
    with pytest.raises(errors.InputError, match="holds 2 NaN"):
        optimize(model)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_original_model_with_nan_outputs_is_exit_2_not_a_pass(tmp_path, capsys):
    onnx.save(_bn_var0_model(), tmp_path / "bn.onnx")
    assert main(["optimize", str(tmp_path / "bn.onnx"), "-q"]) == 2
    line = one_line(capsys)
    assert "original model already outputs inf/NaN" in line and "pass" not in line


def test_nonfinite_original_output_on_a_later_calibration_batch(tmp_path, capsys):
    model = _div_by_zero_on_some_data()
    x = np.random.default_rng(0).standard_normal((40, 1, 4, 4)).astype(np.float32)
    w = numpy_helper.to_array(model.graph.initializer[0])
    b = numpy_helper.to_array(model.graph.initializer[1])
    x[37] = -b[0] / w[0, 0, 0, 0]  # channel 0 is exactly 0 on sample 37: 0/0
    x[37] = np.float32(x[37])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", input=x)
    from onnxrep import verify
    from onnxrep.errors import InputError
    from onnxrep.verify.streaming import compare_on_data
    ref = verify.run(model, {"input": x[37:38]})
    if np.isfinite(ref[model.graph.output[0].name]).all():
        pytest.skip("rounding did not hit exact zero")
    with pytest.raises(InputError, match="calibration data"):
        compare_on_data(model, model, x, rtol=1e-4)


@pytest.mark.parametrize("a, b", [
    ([np.nan, 1.0], [np.nan, 1.0]), ([np.inf, 1.0], [np.inf, 1.0]), ([1.0, 2.0], [np.nan, 2.0]),
    ([1.0, 2.0], [np.inf, 2.0]), ([np.nan, 1.0], [0.0, 1.0]), ([1e-300, 0.0], [1e300, 0.0]),
    ([1e300, 1e300], [-1e300, 1e300]), ([0.0, 0.0], [np.inf, np.nan]), ([np.inf], [-np.inf]),
])
def test_metrics_never_crash_on_nonfinite(a, b, recwarn):
    from onnxrep import verify
    m = verify.metrics(np.array([a]), np.array([b]))
    same = np.array_equal(np.array(a), np.array(b), equal_nan=True)
    assert (m.rel == 0) if same else (m.rel > 1e-3)
    assert not math_domain(recwarn)
    verify.needed_tolerance(m.rel)


def math_domain(recwarn):
    return [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# ---- 13. an empty graph; 14. huge weights -----------------------------------------------------

def test_empty_graph_is_accepted_nothing_to_do(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    model = helper.make_model(helper.make_graph([], "empty", [x], [x]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "e.onnx")
    assert main(["optimize", str(tmp_path / "e.onnx"), "-q"]) == 0
    assert "nothing to equalize" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "e.onnx")]) == 0


def test_huge_weights_print_no_raw_warnings(tmp_path, capsys, recwarn):
    model = Chain().conv(4, scale=1e30).relu().conv(4, scale=1e-30).build()
    onnx.save(model, tmp_path / "big.onnx")
    np.savez(tmp_path / "c.npz", input=batch_for(model, 16))
    for argv in (["optimize", str(tmp_path / "big.onnx")],
                 ["optimize", str(tmp_path / "big.onnx"), "--calib", str(tmp_path / "c.npz"),
                  "--force"],
                 ["inspect", str(tmp_path / "big.onnx")]):
        assert main([*argv, "-q"]) == 0
        err = capsys.readouterr().err
        assert "RuntimeWarning" not in err and "overflow" not in err, err
    assert not math_domain(recwarn)


# ---- 12. layers inside If/Loop bodies, models without weight layers --------------------------

def _if_model():
    """A Conv in the main graph and one in each branch of an If on a scalar condition."""
    rng = np.random.default_rng(0)

    def branch(name):
        w = numpy_helper.from_array(rng.normal(0, 0.5, (3, 3, 1, 1)).astype(np.float32),
                                    f"{name}_w")
        y = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 3, 4, 4])
        return helper.make_graph([helper.make_node("Conv", ["h", f"{name}_w"], [f"{name}_y"],
                                                   name=f"{name}_conv")], name, [], [y], [w])

    w0 = numpy_helper.from_array(rng.normal(0, 0.5, (3, 3, 1, 1)).astype(np.float32), "w0")
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h"], name="main_conv"),
             helper.make_node("If", ["cond"], ["y"], name="if0",
                              then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])], [w0])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_subgraph_layers_are_listed_as_skipped(tmp_path, capsys):
    onnx.save(_if_model(), tmp_path / "if.onnx")
    assert main(["optimize", str(tmp_path / "if.onnx"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "then_conv" in out and "else_conv" in out and "If 'if0'" in out
    assert "skipped 2 layer(s) inside subgraphs" in out
    assert main(["inspect", str(tmp_path / "if.onnx")]) == 0
    out = capsys.readouterr().out
    assert "then_conv" in out and "If/Loop/Scan body" in out


def test_model_without_weight_layers_says_nothing_to_equalize(tmp_path, capsys):
    onnx.save(Chain().relu().build(), tmp_path / "relu.onnx")
    assert main(["optimize", str(tmp_path / "relu.onnx"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "nothing to equalize" in out and "layer  op" not in out


# ---- 9. scalar (0-d) inputs -------------------------------------------------------------------

def test_scalar_input_one_value_or_one_per_sample(tmp_path, capsys):
    from onnxrep.data import load_data
    from onnxrep.errors import DataError

    model = _if_model()
    onnx.save(model, tmp_path / "if.onnx")
    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "same.npz", x=x, cond=np.array(True))
    np.savez(tmp_path / "each.npz", x=x, cond=np.arange(10) % 2 == 0)
    same = load_data(tmp_path / "same.npz", model, batch_size=4)
    batches = list(same.batches())
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    assert all(b["cond"].shape == () and b["cond"] for b in batches)
    each = load_data(tmp_path / "each.npz", model, batch_size=4)
    batches = list(each.batches())
    assert len(batches) == 10 and [bool(b["cond"]) for b in batches] == [i % 2 == 0
                                                                          for i in range(10)]
    for name in ("same.npz", "each.npz"):
        assert main(["optimize", str(tmp_path / "if.onnx"), "--calib", str(tmp_path / name),
                     "-q", "--force"]) == 0
        capsys.readouterr()
    np.savez(tmp_path / "wrong.npz", x=x, cond=np.ones((10, 2), bool))
    with pytest.raises(DataError, match="is a scalar"):
        load_data(tmp_path / "wrong.npz", model)
    np.savez(tmp_path / "count.npz", x=x, cond=np.ones(7, bool))
    with pytest.raises(DataError, match="different sample counts"):
        load_data(tmp_path / "count.npz", model)
    # streamed: a 0-d value in each item
    items = [{"x": x[i:i + 2], "cond": np.array(i % 4 == 0)} for i in range(0, 10, 2)]
    assert [bool(b["cond"]) for b in load_data(items, model, batch_size=2).batches()] == [
        True, False, True, False, True]


# ---- 11. AveragePool ceil_mode with pads before Flatten -> Gemm ----------------------------

def _ceil_pool_model(symbolic: bool):
    """onnx's shape inference says 4x4 after the pool, onnxruntime computes 3x3; the Gemm
    takes onnxruntime's 4 * 3 * 3 features."""
    c = Chain(channels=2, hw=(8, 8)).conv(4).relu()
    c.node("AveragePool", [], kernel_shape=[3, 3], strides=[3, 3], pads=[1, 1, 1, 1],
           ceil_mode=1)
    c.hw = (3, 3)
    model = c.flatten().gemm(5).build()
    if symbolic:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


@pytest.mark.parametrize("symbolic", [False, True])
def test_ceil_mode_pool_before_gemm_never_crashes(tmp_path, capsys, symbolic):
    model = _ceil_pool_model(symbolic)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((16, 2, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", input=x)
    shape = ["--input-shape", "input:2x2x8x8"] if symbolic else []
    for extra in (shape, ["--calib", str(tmp_path / "c.npz")], [*shape, "--input-range=-1,1"]):
        code = main(["optimize", str(tmp_path / "m.onnx"), "-q", "--force", *extra])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        # a static model is refused by onnxruntime's own shape check (exit 2, one line);
        # with symbolic spatial dims it runs, and is optimized on onnxruntime's shapes
        assert code == (0 if symbolic else 2), captured.err
        if code == 2:
            assert "onnxruntime cannot load the model" in captured.err


# ---- 10. float16 models -----------------------------------------------------------------------

def _fp16(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                               t.name))
    for v in [*out.graph.input, *out.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(out)
    return out


def test_fp16_optimize_verifies_with_an_fp16_tolerance_quantize_refuses(tmp_path, capsys):
    base = (Chain(channels=3, hw=(8, 8)).conv(8, outliers={2: 20.0}).relu()
            .conv(8, group=8, outliers={1: 30.0}).relu().conv(8, k=1).relu().gap().flatten()
            .gemm(5).build())
    model = _fp16(base)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", input=batch_for(base, 32).astype(np.float16))
    for extra in ([], ["--calib", str(tmp_path / "c.npz")]):
        assert main(["optimize", str(tmp_path / "m.onnx"), "-q", "--force", *extra]) == 0
        capsys.readouterr()
        out = onnx.load(tmp_path / "m.opt.onnx")
        assert out.graph.initializer[0].data_type == TensorProto.FLOAT16
    for argv in (["quantize", "--calib", str(tmp_path / "c.npz")],
                 ["quantize", "--calib", str(tmp_path / "c.npz"), "--no-optimize"],
                 ["qat", "--data", str(tmp_path / "c.npz")]):
        assert main([argv[0], str(tmp_path / "m.onnx"), *argv[1:], "-q"]) == 2
        assert "float16" in one_line(capsys)
