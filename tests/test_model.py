import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import Chain, conv_relu_conv
from onnxrep.ir import model as model_io
from onnxrep.errors import InputError, UnsupportedModelError
from onnxrep.ir.graph import GraphIndex, attr
from onnxrep.ir.model import load, save


def test_load_rejects_missing_empty_truncated_and_non_onnx(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    with pytest.raises(InputError, match="not an ONNX model|cannot read"):
        load(tmp_path / "text.onnx")
    data = conv_relu_conv().SerializeToString()
    for cut in (7, len(data) // 3, len(data) - 3):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        with pytest.raises(InputError):
            load(tmp_path / "cut.onnx")
    with pytest.raises(InputError, match="directory"):
        load(tmp_path)


def test_unsupported_opset_is_a_clear_error(tmp_path):
    model = conv_relu_conv()
    model.opset_import[0].version = 9
    onnx.save(model, tmp_path / "old.onnx")
    with pytest.raises(UnsupportedModelError, match="opset 9 is not supported"):
        load(tmp_path / "old.onnx")


def test_save_is_atomic_and_refuses_overwrite(tmp_path):
    model = conv_relu_conv()
    out = save(model, tmp_path / "m.onnx")
    assert load(out).SerializeToString() == model.SerializeToString()
    with pytest.raises(InputError, match="exists"):
        save(model, out)
    save(model, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_uses_external_data_past_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)  # as if the model were past 2 GB
    model = conv_relu_conv()
    before = model.SerializeToString()
    out = save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert model.SerializeToString() == before  # the argument is not converted in place
    again = load(out)
    index = GraphIndex(again.graph)
    w = model.graph.node[0].input[1]
    np.testing.assert_array_equal(index.const(w), GraphIndex(model.graph).const(w))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    from onnxrep import verify
    monkeypatch.setattr(verify, "serialize", lambda model: None)
    feeds = verify.random_inputs(model)
    assert verify.compare(model, again, feeds).rel == 0


def test_graph_index_reads_and_writes_constant_node_weights():
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    const = helper.make_node("Constant", [], ["w"],
                             value=numpy_helper.from_array(value, "w_value"))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([const, mm], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    index = GraphIndex(graph)
    assert index.is_const("w") and not index.is_const("x")
    np.testing.assert_array_equal(index.const("w"), value)
    index.set_const("w", value * 2)
    np.testing.assert_array_equal(GraphIndex(graph).const("w"), value * 2)
    assert index.labels == ["Constant#0", "MatMul#1"]


def test_attribute_defaults():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    assert attr(node, "group", 1) == 1
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4)
    assert attr(node, "group", 1) == 4


def test_output_path_checks(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(Chain().conv(4).build(), src)
    with pytest.raises(InputError, match="is the input"):
        model_io.check_output_path(src, src, force=True)
    with pytest.raises(InputError, match="is the input"):
        model_io.check_output_path(src, tmp_path / "." / "m.onnx", force=True)
    assert model_io.default_output(src, "opt").name == "m.opt.onnx"
