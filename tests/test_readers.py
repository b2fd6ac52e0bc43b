"""Data readers: every source kind, batching, and every DataError."""

import zipfile

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader

from graphs import Chain
from onnxrep.data import ImageOptions, load_data
from onnxrep.data.readers import _FileRows, _npz_members
from onnxrep.errors import DataError, InputError


def classifier(batch="N", channels=1, hw=(6, 6)) -> onnx.ModelProto:
    return Chain(channels=channels, hw=hw, batch=batch).conv(4).relu().gap().flatten() \
        .gemm(10).build()


def two_inputs() -> onnx.ModelProto:
    """a [N, 3] + b [N, 3] -> y."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in "ab"]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", ins, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def image_net(shape=("N", 3, "H", "W")) -> onnx.ModelProto:
    """Any-size image input -> GlobalAveragePool."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["image"], ["y"])], "g",
                              [x], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MODEL = classifier()
RNG = np.random.default_rng(0)
X = RNG.standard_normal((70, 1, 6, 6))


def collect(dataset, name="input"):
    batches = list(dataset.batches())
    return [len(b[name]) for b in batches], np.concatenate([b[name] for b in batches])


def error(source, model=MODEL, **kw) -> str:
    with pytest.raises(DataError) as exc:
        list(load_data(source, model, **kw).batches())
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---- sources ---------------------------------------------------------------------------------

def test_array_batches_keep_partial_tail_and_convert_float64():
    ds = load_data(X, MODEL, batch_size=32)
    sizes, data = collect(ds)
    assert sizes == [32, 32, 6] and ds.num_samples == 70 and ds.labels is None
    assert data.dtype == np.float32 and np.array_equal(data, X.astype(np.float32))
    assert ds.first_batch()["input"].shape == (32, 1, 6, 6)
    assert collect(ds)[0] == [32, 32, 6]  # a fresh pass each call


def test_limit_cuts_samples_and_labels(tmp_path):
    np.savez(tmp_path / "d.npz", input=X, labels=np.arange(70) % 10)
    ds = load_data(tmp_path / "d.npz", MODEL, batch_size=16, limit=40)
    assert collect(ds)[0] == [16, 16, 8] and ds.num_samples == 40
    assert np.array_equal(ds.labels, np.arange(40) % 10)


def test_ints_are_converted_for_float_inputs():
    ints = RNG.integers(-3, 3, (5, 1, 6, 6))
    assert np.array_equal(collect(load_data(ints, MODEL))[1], ints.astype(np.float32))


def test_npz_stored_is_read_per_batch_and_compressed_whole(tmp_path):
    np.savez(tmp_path / "s.npz", input=X.astype(np.float32), labels=np.zeros(70, np.int64),
             note=np.array("metadata"))
    np.savez_compressed(tmp_path / "c.npz", input=X.astype(np.float32))
    stored = _npz_members(tmp_path / "s.npz")["input"].rows()
    assert isinstance(stored, _FileRows)
    assert np.array_equal(stored[5:9], X[5:9].astype(np.float32))
    assert isinstance(_npz_members(tmp_path / "c.npz")["input"].rows(), np.ndarray)
    ds = load_data(tmp_path / "s.npz", MODEL)
    assert ds.ignored == ("note",) and ds.labels.dtype == np.int64
    for name in ("s.npz", "c.npz"):
        assert np.array_equal(collect(load_data(tmp_path / name, MODEL))[1],
                              X.astype(np.float32))


def test_npz_uint8_with_preprocess_keys(tmp_path):
    u8 = RNG.integers(0, 256, (9, 1, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", input=u8, preprocess_scale=np.float32(1 / 255),
             preprocess_mean=np.float32(0.286), preprocess_std=np.float32(0.353))
    expected = (u8.astype(np.float32) * np.float32(1 / 255) - np.float32(0.286)) / np.float32(0.353)
    assert np.array_equal(collect(load_data(tmp_path / "d.npz", MODEL, batch_size=4))[1], expected)


def test_npz_uint8_per_channel_preprocess_and_float_input_ignores_it(tmp_path):
    model = classifier(channels=3)
    u8 = RNG.integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    mean = np.array([0.4, 0.5, 0.6], np.float32).reshape(3, 1, 1)
    ds = load_data({"input": u8, "preprocess_mean": mean}, model)
    assert np.allclose(collect(ds)[1], u8 - mean)
    ds = load_data({"input": u8.astype(np.float32), "preprocess_mean": mean}, model)
    assert np.array_equal(collect(ds)[1], u8) and ds.ignored == ("preprocess_mean",)
    assert "does not broadcast" in error({"input": u8, "preprocess_std": np.ones(4)}, model)


def test_npy_for_single_input_c_and_fortran_order(tmp_path):
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "f.npy", np.asfortranarray(X))
    ds = load_data(tmp_path / "x.npy", MODEL, batch_size=50)
    assert collect(ds)[0] == [50, 20] and ds.num_samples == 70
    assert np.array_equal(collect(load_data(tmp_path / "f.npy", MODEL))[1], collect(ds)[1])


def test_dict_for_multi_input_model():
    a, b = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    batch = load_data({"a": a, "b": b}, two_inputs(), batch_size=2).first_batch()
    assert set(batch) == {"a", "b"} and np.array_equal(batch["b"], b[:2])


def test_iterable_of_unbatched_samples_is_rebatched():
    ds = load_data([x for x in X[:7]], MODEL, batch_size=3)  # items without the batch axis
    sizes, data = collect(ds)
    assert sizes == [3, 3, 1] and np.array_equal(data, X[:7].astype(np.float32))
    assert ds.num_samples is None


def test_generator_is_streamed_once_and_first_batch_is_replayed():
    pulled = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield {"input": X[i:i + 1]}

    ds = load_data(gen(), MODEL, batch_size=4)
    assert ds.first_batch()["input"].shape == (4, 1, 6, 6) and len(pulled) == 4
    assert collect(ds)[0] == [4, 4, 2]
    with pytest.raises(DataError, match="read only once"):
        next(ds.batches())


def test_limit_never_pulls_past_it():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield X[i % 70]

    assert collect(load_data(gen(), MODEL, batch_size=4, limit=6))[0] == [4, 2]
    assert len(pulled) == 6


class Reader(CalibrationDataReader):
    def __init__(self, n=5, chunk=2):
        self.items = [{"input": X[i:min(i + chunk, n)].astype(np.float32)}
                      for i in range(0, n, chunk)]
        self.calls = 0
        self.it = iter(self.items)

    def get_next(self):
        self.calls += 1
        return next(self.it, None)


class RewindReader(Reader):
    def rewind(self):
        self.it = iter(self.items)


def test_calibration_data_reader_streams_and_rewinds():
    reader = Reader(n=9, chunk=2)  # chunks 2,2,2,2,1 -> batches of 3
    ds = load_data(reader, MODEL, batch_size=3)
    assert collect(ds)[0] == [3, 3, 3] and reader.calls == 6
    with pytest.raises(DataError, match="no rewind"):
        next(ds.batches())
    ds = load_data(RewindReader(n=5), MODEL, batch_size=2)
    assert ds.first_batch()["input"].shape == (2, 1, 6, 6)
    assert collect(ds)[0] == [2, 2, 1] and collect(ds)[0] == [2, 2, 1]


def test_fixed_batch_model_gets_exact_batches_and_drops_tail():
    ds = load_data(X[:10], classifier(batch=4), batch_size=32)
    assert ds.batch_size == 4 and ds.num_samples == 8
    assert collect(ds)[0] == [4, 4] and ds.dropped == 2
    assert "fewer than the model's fixed batch size 4" in error(X[:3], classifier(batch=4))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.integers(1, 7))
def test_rebatching_preserves_every_sample_in_order(chunk_sizes, batch_size):
    chunks, start = [], 0
    for n in chunk_sizes:
        chunks.append(np.arange(start, start + n, dtype=np.float32)[:, None, None, None]
                      * np.ones((1, 1, 6, 6), np.float32))
        start += n
    sizes, data = collect(load_data(chunks, MODEL, batch_size=batch_size))
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert np.array_equal(data[:, 0, 0, 0], np.arange(start))


# ---- errors ----------------------------------------------------------------------------------

def test_wrong_or_extra_names_list_the_expected_ones():
    assert error({"image": X}) == ("the dict: missing 'input' and has 'image'; the model's "
                                   "inputs are 'input'")
    message = error([{"input": X[:2], "extra": X[:2]}])
    assert "unexpected 'extra'" in message and "inputs are 'input'" in message
    assert "inputs are 'a', 'b'" in error({"a": X[:, 0, 0, :3]}, two_inputs())


def test_shape_and_rank_mismatch_show_expected_and_got():
    assert error(X[:, :, :3]) == ("input 'input' expects samples of shape 1x6x6, got 70 samples "
                                  "of shape 1x3x6 in the array")
    assert "expects samples of shape 1x6x6, got 70 samples of shape 6x6" in error(X[:, 0])
    assert "got data of shape 6" in error(np.zeros(6))


def test_strings_and_objects_are_refused():
    assert "needs float32 data, got <U" in error(X.astype(str))
    assert "got object" in error([np.array([None] * 36, dtype=object).reshape(1, 1, 6, 6)])


def test_nan_and_inf_name_input_and_sample():
    bad = X.copy()
    bad[41, 0, 1, 2] = np.nan
    assert error(bad, batch_size=32) == "input 'input' sample 41 of the array contains NaN"
    bad[41, 0, 1, 2] = 1e39  # finite in float64, inf once converted to float32
    assert "sample 41 of the array contains inf" in error(bad)
    items = [X[0], X[1], X[2] * np.inf]
    assert "sample 2 of the list contains inf" in error(items)


def test_empty_sources():
    assert error(X[:0]) == "the array holds no samples"
    assert error([]) == "the list holds no samples"
    assert error(iter([])) == "the list_iterator holds no samples"


def test_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "x.npy", X[:, 0, 0, :3])
    assert "single-input model; this one has 2 inputs ('a', 'b')" in error(
        tmp_path / "x.npy", two_inputs())
    assert "2 inputs needs dicts {input name: array} with 'a', 'b'" in error(
        [X[0, 0, 0, :3]], two_inputs())


def test_different_sample_counts(tmp_path):
    message = error({"a": np.zeros((4, 3)), "b": np.zeros((5, 3))}, two_inputs())
    assert message == "inputs of the dict have different sample counts: a 4, b 5"


@pytest.mark.parametrize("labels", [np.zeros(69, np.int64), np.zeros(70),
                                    np.array(["text"] * 70)])
def test_labels_that_are_not_class_indices_are_metadata(labels):
    """An OCR calibration file carries its text as labels: calibration needs none, so they are
    listed as not used instead of refused, and accuracy is not scored."""
    data = load_data({"input": X, "labels": labels, "widths": np.ones(70)}, MODEL)
    assert data.labels is None
    assert data.ignored[0] == "widths" and data.ignored[1].startswith(
        "labels (not integer class indices, one per sample (70)")
    assert sum(len(b["input"]) for b in data.batches()) == 70


def test_variable_sample_shapes_cannot_share_a_batch():
    items = [np.zeros((3, 8, 8)), np.zeros((3, 9, 9))]
    assert "different shapes (3x8x8 and 3x9x9)" in error(items, image_net(), batch_size=2)
    batches = list(load_data(items, image_net(), batch_size=1).batches())
    assert [b["image"].shape for b in batches] == [(1, 3, 8, 8), (1, 3, 9, 9)]


def test_bad_paths_and_source_types(tmp_path):
    assert error(tmp_path / "none.npz").startswith("data not found")
    (tmp_path / "d.csv").write_text("1,2")
    assert "expected .npz, .npy or a folder of images" in error(tmp_path / "d.csv")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert "cannot read" in error(tmp_path / "bad.npz")
    np.save(tmp_path / "cut.npy", X)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-100])
    assert error(tmp_path / "cut.npy") == f"{tmp_path / 'cut.npy'} is truncated"
    assert "unsupported data source of type int" in error(3)
    with pytest.raises(InputError, match="only to a folder of images"):
        load_data(X, MODEL, image_options=ImageOptions())
    with pytest.raises(InputError, match="batch size"):
        load_data(X, MODEL, batch_size=0)


def test_npz_with_pickled_objects_is_refused_not_loaded(tmp_path):
    np.savez(tmp_path / "o.npz", input=np.array([object()] * 36).reshape(1, 1, 6, 6))
    assert zipfile.is_zipfile(tmp_path / "o.npz")
    assert "needs float32 data, got object" in error(tmp_path / "o.npz")


# ---- image folders ---------------------------------------------------------------------------

@pytest.fixture
def image_module():
    return pytest.importorskip("PIL.Image", reason="image folders need pillow")


def write_images(image_module, folder, count, size=(10, 8), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = []
    for i in range(count):
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        p = rng.integers(0, 256, shape, dtype=np.uint8)
        image_module.fromarray(p, mode).save(folder / f"img{i:02d}.png")
        pixels.append(p)
    return np.stack(pixels)


def test_flat_image_folder_grayscale_from_model(tmp_path, image_module):
    pixels = write_images(image_module, tmp_path, 5, size=(6, 6), mode="L")
    ds = load_data(tmp_path, MODEL, batch_size=2,
                   image_options=ImageOptions(mean=(0.5,), std=(0.25,)))
    sizes, data = collect(ds)
    assert sizes == [2, 2, 1] and ds.labels is None and ds.num_samples == 5
    assert np.allclose(data[:, 0], (pixels / 255 - 0.5) / 0.25, atol=1e-6)


def test_class_folders_give_labels_rgb_resize_and_nhwc(tmp_path, image_module):
    write_images(image_module, tmp_path / "cat", 2)
    write_images(image_module, tmp_path / "dog", 3, seed=1)
    ds = load_data(tmp_path, classifier(channels=3), image_options=ImageOptions(scale=1.0))
    assert np.array_equal(ds.labels, [0, 0, 1, 1, 1])
    data = collect(ds)[1]
    assert data.shape == (5, 3, 6, 6) and data.max() > 1  # resized 10x8 -> 6x6, scale 1
    nhwc = load_data(tmp_path, image_net(("N", "H", "W", 3)),
                     image_options=ImageOptions(resize=(4, 5)))
    assert collect(nhwc, "image")[1].shape == (5, 4, 5, 3)


def test_image_folder_errors(tmp_path, image_module):
    write_images(image_module, tmp_path / "a", 1)
    assert "give a resize (HxW)" in error(tmp_path, image_net())
    assert "has 1 channels (NCHW) but images are read as RGB" in error(
        tmp_path, MODEL, image_options=ImageOptions(grayscale=False))
    with pytest.raises(InputError, match="image mean needs 1 or 3 values, got 2"):
        load_data(tmp_path, classifier(channels=3), image_options=ImageOptions(mean=(1, 2)))
    (tmp_path / "stray.png").write_bytes(b"not a png")
    assert "both images and class folders ('a')" in error(tmp_path, MODEL)
    (tmp_path / "a" / "img00.png").unlink()
    assert "cannot read image" in error(tmp_path, MODEL)
    (tmp_path / "stray.png").unlink()
    assert error(tmp_path, MODEL).startswith("no images")


def test_image_options_validate():
    with pytest.raises(ValueError):
        ImageOptions(layout="CHW")
    with pytest.raises(ValueError):
        ImageOptions(std=(0.0,))
