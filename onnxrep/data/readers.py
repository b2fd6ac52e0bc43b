"""Calibration and evaluation data: one streaming, validated view over many kinds of source.

``load_data(source, model)`` returns a :class:`Dataset`; ``Dataset.batches()`` yields feed dicts
{input name: array} of ``batch_size`` samples (the last batch may be smaller), converted to the
model's input dtypes and checked against its inputs. Sources:

- ``.npz``: one array per model input keyed by input name, first axis = samples; optional
  ``labels`` (integers, one per sample). A uint8 input with ``preprocess_scale``,
  ``preprocess_mean`` and/or ``preprocess_std`` keys becomes x = (u8 * scale - mean) / std in
  float32 (defaults 1, 0, 1; each a scalar or an array broadcastable against one sample, e.g.
  [C, 1, 1] for NCHW); a uint8 input without them is only cast, and float inputs are taken as
  already preprocessed. Other keys (metadata) are ignored and listed in ``Dataset.ignored``.
  Members stored uncompressed (``np.savez``) are read one batch at a time, compressed ones
  (``np.savez_compressed``) one whole array at a time, on first use.
- ``.npy`` or an ``np.ndarray``: the samples of a single-input model (.npy read per batch).
- a ``dict`` {input name: array}: an .npz held in memory, same keys and rules.
- a folder of images (needs pillow): see :class:`ImageOptions`. Images directly in the folder
  are unlabeled; class subfolders give labels 0, 1, ... in sorted folder-name order.
- any iterable of feed dicts, or of arrays for a single-input model (list, generator, ...); an
  item may be one sample without the batch axis. Streamed, never held whole.
- an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``), streamed; before a
  second pass its ``rewind()`` is called when it has one.

Checks, each a :class:`DataError` of one sentence: missing input names (and unexpected ones in
streamed feeds, which onnxruntime would refuse), sample shapes against the model's fixed dims,
dtypes (any float or integer data for a float input is converted silently; strings and objects
are refused), NaN/inf (naming the input and the sample index), no samples at all. Arrays are
checked when ``load_data`` is called, streamed items as they arrive. A model whose batch dim is
fixed at B gets batches of exactly B; a smaller tail is dropped and counted in
``Dataset.dropped``.
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx

from onnxrep.errors import DataError, InputError
from onnxrep.verify import InputSpec, input_specs

Feeds = dict[str, np.ndarray]
LABELS = "labels"
PREPROCESS = ("preprocess_scale", "preprocess_mean", "preprocess_std")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


@dataclass(frozen=True)
class ImageOptions:
    """How image files become one input: x = (pixel * scale - mean) / std, per channel.

    ``resize`` (H, W): default the model's fixed spatial size (bilinear when it differs).
    ``layout`` "NCHW" or "NHWC": default from the model (the axis of size 1 or 3).
    ``grayscale``: default from the model's channel count (1 -> grayscale, else RGB).
    ``mean`` / ``std``: one value, or one per channel.
    """

    resize: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str | None = None
    grayscale: bool | None = None

    def __post_init__(self):
        if self.layout not in (None, "NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ValueError(f"resize must be two positive sizes (H, W), not {self.resize}")
        if not self.mean or not self.std:
            raise ValueError("mean and std need at least one value each")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must not be zero, got {self.std}")


class Dataset:
    """Validated batches of feeds over a source (see the module docstring).

    ``num_samples`` and ``labels`` are known for arrays, .npz/.npy and image folders, None for
    streamed sources. ``batch_size`` is the model's fixed batch dim when it has one;
    ``dropped`` counts the tail samples the last pass left out for it.
    """

    def __init__(self, chunks: Callable[[], Iterable[Feeds]], specs: list[InputSpec], *,
                 name: str, batch_size: int, fixed_batch: bool, limit: int | None,
                 num_samples: int | None = None, labels: np.ndarray | None = None,
                 ignored: tuple[str, ...] = (), replayable: bool = True):
        self.name, self.batch_size, self.num_samples, self.labels = (name, batch_size,
                                                                     num_samples, labels)
        self.ignored = ignored  # keys of an .npz/dict that are neither inputs nor used extras
        self.dropped = 0
        self._chunks, self._specs, self._fixed, self._limit = chunks, specs, fixed_batch, limit
        self.replayable = replayable  # False for one-shot sources (generators, readers)
        self._head: tuple[Feeds, Iterator[Feeds]] | None = None  # peeked from a one-shot source

    def batches(self) -> Iterator[Feeds]:
        """A fresh pass over the data; a one-shot source raises DataError on a second pass."""
        if self._head is not None:
            first, rest = self._head
            self._head = None
            return itertools.chain([first], rest)
        return self._stream()

    def first_batch(self) -> Feeds:
        """The first batch; for a one-shot source it is kept and replayed by ``batches()``."""
        if self._head is not None:
            return self._head[0]
        stream = self._stream()
        first = next(stream)
        if self.replayable:
            stream.close()
        else:
            self._head = (first, stream)
        return first

    def _stream(self) -> Iterator[Feeds]:
        self.dropped = 0
        checked = _take(self._checked(self._chunks()), self._limit)
        yielded = 0
        scalars = [s.name for s in self._specs if s.shape == ()]
        for batch in _rebatch(checked, self.batch_size):
            n = _rows(batch)
            if self._fixed and n < self.batch_size:
                self.dropped = n
                break
            yielded += n
            yield _scalars_last(batch, scalars, self.name) if scalars else batch
        if yielded == 0:
            if self.dropped:
                raise DataError(f"{self.name} holds {self.dropped} samples, fewer than the "
                                f"model's fixed batch size {self.batch_size}")
            raise DataError(f"{self.name} holds no samples")

    def _checked(self, chunks: Iterable[Feeds]) -> Iterator[Feeds]:
        offset = 0
        for feeds in chunks:
            feeds = check_feeds(feeds, self._specs, self.name, offset)
            offset += _rows(feeds)
            yield feeds


def _scalars_last(batch: Feeds, scalars: list[str], where: str) -> Feeds:
    """Internally a scalar input carries one value per sample; onnxruntime takes one 0-d value
    per run: the batch's (all equal) value, placed after the batched inputs so that the first
    feed still gives the batch size."""
    out = {k: v for k, v in batch.items() if k not in scalars}
    for name in scalars:
        values = batch[name]
        if values.size and not (values == values[0]).all():
            raise DataError(f"scalar input '{name}' takes different values within one batch of "
                            f"{where}; use batch size 1")
        out[name] = np.array(values[0]) if values.size else values.reshape(())
    return out


def auto_batch_size(sample_bytes: int) -> int:
    """Samples per onnxruntime run when the user gives no batch size: as many as fit
    ``BATCH_BYTES`` of input, 1 to ``MAX_AUTO_BATCH``. Activations are tens to hundreds of
    times the input, and calibration keeps every quantized tensor of a run at once: batches of
    32 480x640 images held 8.5 GB in `quantize` on PP-OCRv4's detector (1.8 GB one image per
    run), and 32 text lines of 48x320 4.1 GB on PP-OCRv6's recognizer, whose 18710-class
    output alone is 3 MB a line: 1.28 GB at 11 lines per run, 0.65 GB at 1 in the same time
    (26 s; onnxruntime alone 0.57 GB), hence 512 KiB (2 lines). Tiny inputs keep 32 per run."""
    return max(1, min(MAX_AUTO_BATCH, BATCH_BYTES // max(int(sample_bytes), 1)))


BATCH_BYTES = 512 * 2**10
MAX_AUTO_BATCH = 32


def load_data(source: Any, model: onnx.ModelProto, *, batch_size: int | None = None,
              limit: int | None = None, image_options: ImageOptions | None = None) -> Dataset:
    """A :class:`Dataset` over ``source`` for ``model``'s inputs; array sources are checked now.
    ``batch_size`` None: :func:`auto_batch_size` of a sample's input bytes (32 for streamed
    sources, whose items are not known in advance)."""
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, not {limit}")
    specs = input_specs(model)
    fixed = next((s.shape[0] for s in specs if _fixed_dim(s.shape[:1])), None)
    common = dict(specs=specs, batch_size=fixed or batch_size, fixed_batch=fixed is not None,
                  limit=limit)
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and not path.exists():
        raise DataError(f"data not found: {path}")
    if path is not None and not path.is_dir():
        _check_regular(path)
    if image_options is not None and not (path and path.is_dir()):
        raise InputError("image options apply only to a folder of images")
    if path is not None:
        if path.is_dir():
            return _image_dataset(path, image_options or ImageOptions(), common)
        if path.suffix.lower() == ".npz":
            return _array_dataset(_npz_members(path), str(path), common)
        if path.suffix.lower() == ".npy":
            return _array_dataset({_single(specs, path.name): _open_npy(path)}, str(path), common)
        raise DataError(f"unsupported data file {path}: expected .npz, .npy or a folder of images")
    if isinstance(source, np.ndarray):
        return _array_dataset({_single(specs, "an array"): source}, "the array", common)
    if isinstance(source, Mapping):
        return _array_dataset({k: np.asarray(v) for k, v in source.items()}, "the dict", common)
    streamed = {**common, "batch_size": common["batch_size"] or MAX_AUTO_BATCH}
    if callable(getattr(source, "get_next", None)):
        return _reader_dataset(source, streamed)
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        return _iterable_dataset(source, streamed)
    raise DataError(f"unsupported data source of type {type(source).__name__}: expected a path, "
                    "an array, a dict of arrays, an iterable of feeds or a CalibrationDataReader")


def as_dataset(source: Any, model: onnx.ModelProto | str | os.PathLike, *,
               batch_size: int | None = None, limit: int | None = None,
               image_options: ImageOptions | None = None) -> Dataset:
    """The one entry from user data to a :class:`Dataset`: ``source`` itself when it already is
    one, else :func:`load_data` over it for ``model``'s inputs (a proto, or a path whose graph
    is read without its external weights)."""
    if isinstance(source, Dataset):
        return source
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    return load_data(source, model, batch_size=batch_size, limit=limit,
                     image_options=image_options)


def _check_regular(path: Path) -> None:
    """A data file must be a regular file: stat only, so a FIFO is refused without opening it."""
    from onnxrep.ir.model import check_input_file

    try:
        check_input_file(path, "a data file (.npz, .npy) or a folder of images")
    except InputError as exc:
        raise DataError(str(exc)) from None


# ---- checks -----------------------------------------------------------------------------------

def check_feeds(feeds: Mapping[str, Any], specs: list[InputSpec], where: str,
                offset: int = 0) -> Feeds:
    """Names, shapes, dtypes and finiteness of one chunk; returns contiguous arrays of the
    model's dtypes. ``offset`` is the chunk's first sample index, for messages."""
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    check_arrays(feeds, specs, where)
    out = {}
    for spec in specs:
        with np.errstate(over="ignore"):  # a float64 beyond float32's range: inf, refused below
            a = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
        if a.dtype.kind == "f" and a.size:
            finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            if not finite.all():
                i = int(np.argmin(finite))
                what = "NaN" if np.isnan(a[i]).any() else "inf"
                raise DataError(f"input '{spec.name}' sample {offset + i} of {where} "
                                f"contains {what}")
        out[spec.name] = a
    return out


def check_arrays(arrays: Mapping[str, Any], specs: list[InputSpec], where: str, *,
                 others_ok: bool = False) -> int:
    """Names, sample shapes, dtypes (from .shape/.dtype only) and equal sample counts;
    returns the sample count. Keys that are not inputs are an error unless ``others_ok``."""
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in arrays]
    extra = sorted(set(arrays) - set(expected))
    if missing or (extra and not others_ok):
        found = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"{'has' if others_ok else 'unexpected'} {_names(extra)}"] if extra else [])
        raise DataError(f"{where}: {' and '.join(found)}; the model's inputs are "
                        f"{_names(expected)}")
    counts = {}
    for spec in specs:
        shape, dtype = tuple(arrays[spec.name].shape), np.dtype(arrays[spec.name].dtype)
        if spec.shape == ():  # a scalar input: one 0-d value for all, or one value per sample
            if len(shape) > 1:
                raise DataError(f"input '{spec.name}' is a scalar: expected one value (a 0-d "
                                f"array) or one per sample (a 1-d array), got shape "
                                f"{_fmt(shape)} in {where}")
            if not _convertible(dtype, spec.dtype):
                raise DataError(f"input '{spec.name}' needs {spec.dtype} data, got {dtype} in "
                                f"{where}")
            if shape:
                counts[spec.name] = shape[0]
            continue
        if len(shape) != len(spec.shape) or not _fits(spec.shape[1:], shape[1:]):
            got = (f"{shape[0]} samples of shape {_fmt(shape[1:])}" if len(shape) > 1 else
                   f"data of shape {_fmt(shape) or '()'}")
            raise DataError(f"input '{spec.name}' expects samples of shape "
                            f"{_fmt(spec.shape[1:])}, got {got} in {where}")
        if not _convertible(dtype, spec.dtype):
            raise DataError(f"input '{spec.name}' needs {spec.dtype} data, got {dtype} in {where}")
        counts[spec.name] = shape[0]
    if len(set(counts.values())) > 1:
        raise DataError(f"inputs of {where} have different sample counts: "
                        + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not counts and specs:  # scalar inputs only, each one 0-d value: one sample
        return 1
    return next(iter(counts.values()), 0)


def _convertible(data: np.dtype, target: np.dtype) -> bool:
    if data.kind not in "biuf":
        return False
    if target.kind in "fc":
        return True
    return target.kind in "iu" and data.kind in "biu" or target.kind == data.kind == "b"


def _fits(expected: tuple, got: tuple) -> bool:
    return all(not _fixed_dim((d,)) or d == g for d, g in zip(expected, got))


def _fixed_dim(dims: tuple) -> bool:
    return bool(dims) and isinstance(dims[0], int) and dims[0] > 0


def _fmt(shape: tuple) -> str:
    return "x".join(str(d) if d not in (None, "") else "?" for d in shape)


def _names(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _single(specs: list[InputSpec], what: str) -> str:
    if len(specs) != 1:
        raise DataError(f"{what} can feed only a single-input model; this one has "
                        f"{len(specs)} inputs ({_names([s.name for s in specs])}): use an .npz "
                        "or a dict with one array per input")
    return specs[0].name


# ---- batching ---------------------------------------------------------------------------------

def _rows(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def _take(chunks: Iterable[Feeds], limit: int | None) -> Iterator[Feeds]:
    """At most ``limit`` samples; never pulls a chunk past the limit from the source."""
    if limit is None:
        yield from chunks
        return
    left = limit
    for feeds in chunks:
        n = _rows(feeds)
        yield feeds if n <= left else {k: v[:left] for k, v in feeds.items()}
        left -= n
        if left <= 0:
            return


def _rebatch(chunks: Iterable[Feeds], size: int) -> Iterator[Feeds]:
    """Chunks of any size -> batches of ``size`` rows (the last may be smaller); a chunk that
    already is one batch passes through without a copy."""
    parts, have = [], 0
    for feeds in chunks:
        n, start = _rows(feeds), 0
        while start < n:
            take = min(size - have, n - start)
            parts.append(feeds if take == n else {k: v[start:start + take]
                                                  for k, v in feeds.items()})
            have, start = have + take, start + take
            if have == size:
                yield _concat(parts)
                parts, have = [], 0
    if parts:
        yield _concat(parts)


def _concat(parts: list[Feeds]) -> Feeds:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in parts[0]:
        shapes = sorted({p[name].shape[1:] for p in parts})
        if len(shapes) > 1:
            raise DataError(f"input '{name}' has samples of different shapes ({_fmt(shapes[0])} "
                            f"and {_fmt(shapes[1])}) that cannot share a batch; use batch size 1")
        out[name] = np.concatenate([p[name] for p in parts])
    return out


# ---- arrays: .npz, .npy, ndarray, dict --------------------------------------------------------

class _FileRows:
    """A C-order array stored raw in a file from ``offset`` (an .npy, or an uncompressed .npz
    member): row slices are read on demand, so memory holds one batch (the pages of a memory
    map would stay resident)."""

    def __init__(self, path: Path, offset: int, shape: tuple, dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), dtype
        self._row = int(np.prod(self.shape[1:], dtype=np.int64))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        count = max(stop - start, 0) * self._row
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self._row * self.dtype.itemsize)
            data = np.fromfile(f, self.dtype, count)
        if data.size != count:
            raise DataError(f"{self.path} is truncated")
        return data.reshape(-1, *self.shape[1:])


class _NpzMember:
    """One array of an .npz: shape and dtype from its header; ``rows()`` reads uncompressed
    members batch by batch, compressed ones whole on first use. Pickles are never loaded."""

    def __init__(self, path: Path, info: zipfile.ZipInfo, zf: zipfile.ZipFile):
        self.path, self.info, self.key = path, info, info.filename[:-4]
        self._verified = False
        with zf.open(info) as f:
            self.shape, self.fortran, self.dtype = _npy_header(f)

    def verify(self) -> None:
        """Check the member's CRC-32 once, streamed in 4 MB reads (memory: one read): the
        uncompressed members are otherwise read by offset, which zipfile never checks."""
        if self._verified:
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.info) as f:
                while f.read(4 << 20):
                    pass
        except Exception as exc:  # BadZipFile (bad CRC-32), zlib.error, OSError, ...
            raise DataError(f"{self.path} is corrupted ('{self.key}': {_first_line(exc)})") \
                from None
        self._verified = True

    def rows(self) -> _FileRows | np.ndarray:
        if self.info.compress_type != zipfile.ZIP_STORED or self.fortran:
            return self.array()
        self.verify()
        with open(self.path, "rb") as f:  # skip the zip local header, then the .npy header
            f.seek(self.info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            f.seek(self.info.header_offset + 30 + name_len + extra_len)
            _npy_header(f)
            return _FileRows(self.path, f.tell(), self.shape, self.dtype)

    def array(self) -> np.ndarray:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return z[self.key]
        except Exception as exc:  # zlib.error, BadZipFile (CRC), a garbled header, ...
            raise DataError(f"cannot read '{self.key}' of {self.path} (corrupted?): "
                            f"{_first_line(exc)}") from None


def _npy_header(f) -> tuple:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(f)


def _npz_members(path: Path) -> dict[str, _NpzMember]:
    try:
        with zipfile.ZipFile(path) as zf:
            return {m.key: m for m in (_NpzMember(path, info, zf) for info in zf.infolist()
                                       if info.filename.endswith(".npy"))}
    except Exception as exc:  # BadZipFile, zlib.error, a garbled .npy header (TokenError), ...
        raise DataError(f"cannot read {path} as .npz: {_first_line(exc)}") from None


def _open_npy(path: Path) -> _FileRows | np.ndarray:
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _npy_header(f)
            if not fortran:
                return _FileRows(path, f.tell(), shape, dtype)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a garbled header (ValueError, TokenError, SyntaxError), OSError
        raise DataError(f"cannot read {path} as .npy: {_first_line(exc)}") from None


def _lazy(a) -> _FileRows | np.ndarray:
    return a.rows() if isinstance(a, _NpzMember) else a


def _whole(a) -> np.ndarray:
    return a.array() if isinstance(a, _NpzMember) else np.asarray(a)


def _array_dataset(arrays: dict, name: str, common: dict) -> Dataset:
    """Arrays keyed by input name plus optional ``labels`` and ``preprocess_*`` (applied to
    uint8 inputs; float inputs are taken as preprocessed); other keys (metadata) are listed in
    ``Dataset.ignored``."""
    specs = common["specs"]
    n = check_arrays(arrays, specs, name, others_ok=True)
    if n == 0:
        raise DataError(f"{name} holds no samples")
    inputs = {s.name: arrays[s.name] for s in specs}
    per_sample = []
    for spec in specs:
        if spec.shape == ():  # tiny: read whole; a 0-d value is repeated for every sample
            value = np.asarray(_whole(inputs[spec.name]))
            if value.ndim == 1:
                per_sample.append(spec.name)
            inputs[spec.name] = value if value.ndim == 1 else np.broadcast_to(value, (n,))
    if per_sample:
        common = _scalar_batches(common, per_sample, name)
    uint8 = any(np.dtype(a.dtype) == np.uint8 for a in inputs.values())
    pre = [np.asarray(_whole(arrays[k]), np.float32) if uint8 and k in arrays and k not in inputs
           else None for k in PREPROCESS]
    for key, value in zip(PREPROCESS, pre):
        for spec in specs:
            if spec.shape == ():
                continue
            sample = inputs[spec.name].shape[1:]
            if value is not None and not _broadcasts(value.shape, sample):
                raise DataError(f"{key} of shape {_fmt(value.shape) or '()'} in {name} does not "
                                f"broadcast against samples of shape {_fmt(sample)}")
    labels, unusable = None, None
    if LABELS in arrays and LABELS not in inputs:
        labels, unusable = _labels(_whole(arrays[LABELS]), n)
    used = {*inputs, *([LABELS] if labels is not None or unusable else []),
            *(k for k, v in zip(PREPROCESS, pre) if v is not None)}
    if common["batch_size"] is None:
        sample = sum(4 * int(np.prod(a.shape[1:], dtype=np.int64)) for a in inputs.values())
        common = {**common, "batch_size": auto_batch_size(sample)}
    size, limit = common["batch_size"], common["limit"]
    count = min(n, limit or n)
    if common["fixed_batch"]:
        count -= count % size

    def chunks() -> Iterator[Feeds]:
        data = {k: _lazy(v) for k, v in inputs.items()}
        for start in range(0, min(n, limit or n), size):
            batch = {k: v[start:start + size] for k, v in data.items()}
            yield {k: _preprocess(v, *pre) if v.dtype == np.uint8 else v
                   for k, v in batch.items()}

    return Dataset(chunks, name=name, num_samples=count,
                   labels=None if labels is None else labels[:count],
                   ignored=tuple(sorted(set(arrays) - used)) + (
                       (f"{LABELS} ({unusable})",) if unusable else ()), **common)


def _scalar_batches(common: dict, names: list[str], where: str) -> dict:
    """A scalar input takes one value per onnxruntime run, so one value per sample means
    batches of one sample."""
    if common["fixed_batch"] and common["batch_size"] != 1:
        raise DataError(f"{where} gives one value per sample for scalar input "
                        f"{_names(names)}, which needs batches of 1, but the model's batch is "
                        f"fixed at {common['batch_size']}; give one 0-d value for all samples")
    return {**common, "batch_size": 1}


def _broadcasts(shape: tuple, sample: tuple) -> bool:
    try:
        return np.broadcast_shapes(shape, sample) == tuple(sample)
    except ValueError:
        return False


def _preprocess(u8: np.ndarray, scale, mean, std) -> np.ndarray:
    x = u8.astype(np.float32)
    if scale is not None:
        x *= scale
    if mean is not None:
        x -= mean
    if std is not None:
        x /= std
    return x


def _labels(labels: np.ndarray, n: int) -> tuple[np.ndarray | None, str | None]:
    """(class indices, None), or (None, why they are not class indices): labels of another
    kind (an OCR model's strings) are metadata, which calibration never needs."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        return None, (f"not integer class indices, one per sample ({n}): {labels.dtype} of "
                      f"shape {_fmt(labels.shape) or '()'}")
    return labels.astype(np.int64), None


# ---- streamed: iterables and CalibrationDataReader ---------------------------------------------

def _item_feeds(item: Any, specs: list[InputSpec], name: str, index: int) -> Feeds:
    """One item -> feeds with a batch axis (added when the item is a single sample)."""
    if isinstance(item, Mapping):
        feeds = {k: np.asarray(v) for k, v in item.items()}
    elif len(specs) == 1:
        feeds = {specs[0].name: np.asarray(item)}
    else:
        raise DataError(f"item {index} of {name} is a {type(item).__name__}; a model with "
                        f"{len(specs)} inputs needs dicts {{input name: array}} with "
                        f"{_names([s.name for s in specs])}")
    for spec in specs:
        a = feeds.get(spec.name)
        if a is not None and spec.shape != () and a.ndim == len(spec.shape) - 1:
            feeds[spec.name] = a[None]
    rows = next((len(feeds[s.name]) for s in specs if s.shape != () and s.name in feeds), 1)
    for spec in specs:  # a scalar input's one value holds for the item's samples
        a = feeds.get(spec.name)
        if a is not None and spec.shape == () and a.ndim == 0:
            feeds[spec.name] = np.broadcast_to(a, (rows,))
    return feeds


def _iterable_dataset(source: Iterable, common: dict) -> Dataset:
    name = f"the {type(source).__name__}"
    one_shot = iter(source) is source
    passes = itertools.count()

    def chunks() -> Iterator[Feeds]:
        if one_shot and next(passes):
            raise DataError(f"{name} can be read only once; pass a list or another re-iterable "
                            "collection to read it again")
        for i, item in enumerate(source):
            yield _item_feeds(item, common["specs"], name, i)

    return Dataset(chunks, name=name, replayable=not one_shot, **common)


def _reader_dataset(reader: Any, common: dict) -> Dataset:
    name = f"the {type(reader).__name__} reader"
    rewind = getattr(reader, "rewind", None)
    passes = itertools.count()

    def chunks() -> Iterator[Feeds]:
        if next(passes):
            if not callable(rewind):
                raise DataError(f"{name} can be read only once (it has no rewind())")
            rewind()
        for i in itertools.count():
            item = reader.get_next()
            if item is None:
                return
            yield _item_feeds(item, common["specs"], name, i)

    return Dataset(chunks, name=name, replayable=callable(rewind), **common)


# ---- image folders ----------------------------------------------------------------------------

def _image_dataset(root: Path, options: ImageOptions, common: dict) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading a folder of images needs pillow: "
                        "pip install 'onnxrep[images]'") from None
    spec = _image_spec(common["specs"], root)
    layout, gray, (h, w), mean, std = _image_geometry(spec, options)
    files, labels = _image_files(root)
    if common["batch_size"] is None:
        common = {**common, "batch_size": auto_batch_size(4 * h * w * (1 if gray else 3))}
    limit, size = common["limit"], common["batch_size"]
    count = min(len(files), limit or len(files))
    if common["fixed_batch"]:
        count -= count % size

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if gray else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                return np.asarray(im, np.float32)
        except Exception as exc:  # OSError, ValueError, DecompressionBombError, ...
            raise DataError(f"cannot read image {path}: {_first_line(exc)}") from None

    def chunks() -> Iterator[Feeds]:
        for start in range(0, min(len(files), limit or len(files)), size):
            x = np.stack([read(p) for p in files[start:start + size]])
            x = (x.reshape(*x.shape[:3], -1) * np.float32(options.scale) - mean) / std
            yield {spec.name: x.transpose(0, 3, 1, 2) if layout == "NCHW" else x}

    return Dataset(chunks, name=str(root), num_samples=count,
                   labels=None if labels is None else labels[:count], **common)


def _image_spec(specs: list[InputSpec], root: Path) -> InputSpec:
    name = _single(specs, f"a folder of images ({root})")
    return next(s for s in specs if s.name == name)


def _image_geometry(spec: InputSpec, options: ImageOptions) -> tuple:
    """(layout, grayscale, (H, W), mean, std) from the options, defaults from the model."""
    if len(spec.shape) != 4:
        raise DataError(f"a folder of images feeds a 4-D image input; input '{spec.name}' has "
                        f"shape {_fmt(spec.shape)}")
    small = lambda d: d in (1, 3)  # noqa: E731 - a channel axis
    layout = options.layout or ("NHWC" if small(spec.shape[3]) and not small(spec.shape[1])
                                else "NCHW")
    c, h, w = spec.shape[1:] if layout == "NCHW" else (spec.shape[3], *spec.shape[1:3])
    gray = options.grayscale if options.grayscale is not None else c == 1
    channels = 1 if gray else 3
    if _fixed_dim((c,)) and c != channels:
        raise DataError(f"input '{spec.name}' has {c} channels ({layout}) but images are read as "
                        f"{'grayscale' if gray else 'RGB'}")
    size = options.resize or ((h, w) if _fixed_dim((h,)) and _fixed_dim((w,)) else None)
    if size is None:
        raise DataError(f"input '{spec.name}' has no fixed height and width "
                        f"({_fmt(spec.shape)}): give a resize (HxW)", option="resize")
    stats = []
    for what, values in (("mean", options.mean), ("std", options.std)):
        if len(values) not in (1, channels):
            raise InputError(f"image {what} needs 1 or {channels} values, got {len(values)}")
        stats.append(np.asarray(values, np.float32))
    return layout, gray, tuple(size), *stats


def _image_files(root: Path) -> tuple[list[Path], np.ndarray | None]:
    """Images directly in ``root`` (no labels), or in class subfolders (labels by sorted name)."""
    files = _images_in(root)
    classes = [d for d in sorted(root.iterdir())
               if d.is_dir() and not d.name.startswith(".") and _images_in(d)]
    if files and classes:
        raise DataError(f"{root} holds both images and class folders ('{classes[0].name}'); "
                        "use one layout")
    if classes:
        per_class = [_images_in(d) for d in classes]
        labels = np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(per_class)])
        return [p for f in per_class for p in f], labels
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    return files, None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
