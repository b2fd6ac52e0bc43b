"""Loading and saving ONNX models.

``load`` validates what it reads and raises :class:`InputError` with one clear sentence for a
missing, empty, truncated or non-ONNX file. ``save`` writes atomically (temp file + rename in
the destination directory) and switches to external data past protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from onnxrep.errors import InputError, UnsupportedModelError

_CHECKER_LIMIT = 64 * 2**20  # bytes; larger models are validated by onnxruntime instead
PROTOBUF_LIMIT = 2**31 - 1  # bytes in one protobuf message
MIN_OPSET = 11
MAX_OPSET = onnx.defs.onnx_opset_version()


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file (external data included).

    Files up to 64 MB go through ``onnx.checker``; larger ones only through the parser, since
    the checker would hold a second copy, and are validated when onnxruntime loads them."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        reason = "not an ONNX model or truncated" if "pars" in str(exc).lower() else str(exc)
        raise InputError(f"{path}: cannot read ONNX: {reason}") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph) or truncated")
    if path.stat().st_size <= _CHECKER_LIMIT:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise InputError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    check_opset(model)
    return model


def check_opset(model: onnx.ModelProto) -> int:
    """Return the default-domain opset, or raise if onnxrep does not support it."""
    version = opset_version(model)
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise UnsupportedModelError(
            f"opset {version} is not supported (supported: {MIN_OPSET}..{MAX_OPSET}); "
            "convert it with onnx.version_converter.convert_version(model, 17)"
        )
    return version


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UnsupportedModelError("model declares no default-domain opset")


def save(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically; never leaves a half-written file behind.

    Models too large for one protobuf get their tensors in ``<name>.data`` beside the file.
    Does not mutate ``model`` (external-data conversion is done on a copy).
    """
    with atomic_output(path, force=force) as tmp:
        write_to(model, tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it (and its ``.data``) into place only
    when the block succeeds, so a failure or a failed check leaves nothing behind."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path}: output exists", option="force")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        yield tmp
        data = tmpdir / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_to(model: onnx.ModelProto, path: Path) -> None:
    """Serialize ``model`` to ``path`` (non-atomic; ``save`` wraps it).

    Streams: protobuf fields may come in any order, so the model without its graph, the graph
    without its initializers, then each initializer are written one after another. Memory
    beyond the model itself stays at one tensor, where ``SerializeToString`` would need two
    copies of the whole model. Past 2 GB, tensors go to ``<name>.data`` (external data).
    """
    graph = model.graph
    head = _without(model, "graph")
    graph_head = _without(graph, "initializer")
    sizes = [t.ByteSize() for t in graph.initializer]
    graph_len = len(graph_head) + sum(1 + _varint_len(n) + n for n in sizes)
    if len(head) + graph_len + 16 > PROTOBUF_LIMIT:
        big = onnx.ModelProto()
        big.CopyFrom(model)
        onnx.save_model(big, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        return
    with open(path, "wb") as f:
        f.write(head)
        f.write(_GRAPH_TAG + _varint(graph_len) + graph_head)
        for t, n in zip(graph.initializer, sizes):
            f.write(_INITIALIZER_TAG + _varint(n))
            f.write(t.SerializeToString())


_GRAPH_TAG = bytes([7 << 3 | 2])  # ModelProto.graph, length-delimited
_INITIALIZER_TAG = bytes([5 << 3 | 2])  # GraphProto.initializer, length-delimited


def _without(message, skipped: str) -> bytes:
    """Serialize every field of ``message`` except ``skipped``, without copying that field."""
    part = type(message)()
    for fd, value in message.ListFields():
        if fd.name == skipped:
            continue
        if _repeated(fd):
            getattr(part, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(part, fd.name).CopyFrom(value)
        else:
            setattr(part, fd.name, value)
    return part.SerializeToString()


def _repeated(fd) -> bool:
    if hasattr(fd, "is_repeated"):  # protobuf >= 5.28 deprecates ``label``
        return fd.is_repeated
    return fd.label == fd.LABEL_REPEATED


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None past protobuf's 2 GB limit (use external data then)."""
    try:
        return model.SerializeToString()
    except ValueError:
        return None


def default_output(input_path: str | os.PathLike, suffix: str) -> Path:
    """``model.onnx`` -> ``model.<suffix>.onnx`` beside the input."""
    p = Path(input_path)
    return p.with_name(f"{p.stem}.{suffix}.onnx")


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike,
                      force: bool) -> Path:
    """Refuse to write over the input, or over an existing output without ``force``."""
    src, dst = Path(input_path), Path(output_path)
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise InputError(f"{dst}: output path is the input file; choose another output",
                         option="output")
    if dst.exists() and not force:
        raise InputError(f"{dst}: output exists", option="force")
    if dst.is_dir():
        raise InputError(f"{dst}: is a directory")
    return dst


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
