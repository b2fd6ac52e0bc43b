"""Loading and saving ONNX models.

``load`` validates what it reads and raises :class:`InputError` with one clear sentence for a
missing, empty, truncated or non-ONNX file. ``save`` writes atomically (temp file + rename in
the destination directory) and switches to external data past protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
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
    path = check_input_file(path, "an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        reason = "not an ONNX model or truncated" if "pars" in str(exc).lower() else str(exc)
        raise InputError(f"{path}: cannot read ONNX: {reason}") from None
    if model.ir_version == 0 or not model.HasField("graph") or not (
            model.graph.node or model.graph.output):
        raise InputError(f"{path}: not an ONNX model (no graph) or truncated")
    if path.stat().st_size <= _CHECKER_LIMIT:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise InputError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    check_opset(model)
    return model


def check_input_file(path: str | os.PathLike, what: str = "a file") -> Path:
    """``path`` as a Path when it is an existing, non-empty regular file; one-sentence
    :class:`InputError` otherwise. Only ``stat`` is used, so a FIFO is refused without being
    opened (opening one blocks until a writer appears)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {_strerror(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; expected {what}")
    if st.st_size == 0:
        raise InputError(f"{path}: file is empty")
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _errno(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None


def _strerror(exc: OSError) -> str:
    """'no space left on device', 'permission denied', ..."""
    code = _errno(exc)
    text = exc.strerror or (os.strerror(code) if code else str(exc))
    return (text or type(exc).__name__).lower()


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
    _check_writable_target(path)
    tmpdir = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp = tmpdir / path.name
        yield tmp
        data = tmpdir / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(tmp, path)
    except OSError as exc:
        if _errno(exc) in _WRITE_ERRORS or isinstance(exc, PermissionError):
            raise InputError(f"cannot write {path}: {_strerror(exc)}", option="output") from None
        raise
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def os_error_text(exc: OSError) -> str | None:
    """'cannot write FILE: no space left on device' for an error of the disk or the
    permissions (temporary files included), else None."""
    if _errno(exc) not in WRITE_ERRORS and not isinstance(exc, PermissionError):
        return None
    target = exc.filename or "a temporary file"
    return f"cannot write {target}: {_strerror(exc)}"


# errors of the destination (disk, quota, permissions), not of onnxrep: exit 2, one line
WRITE_ERRORS = _WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.EFBIG, errno.EIO, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST, errno.ENOENT, errno.EXDEV}


def _check_writable_target(path: Path) -> None:
    """An existing output must be a regular file (a rename over /dev/null or a FIFO would
    replace the node) and never a directory."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise InputError(f"cannot write {path}: {_strerror(exc)}", option="output") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory", option="output")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; onnxrep writes "
                         "only regular files", option="output")


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
                      force: bool, *, suffix: str | None = None) -> Path:
    """Refuse to write over the input, over any file the input reads (its external data), over
    a device, FIFO, socket or directory, or over an existing output without ``force``.

    With ``suffix``, an output path that names a directory (a trailing slash, or an existing
    directory) means ``<dir>/<input stem>.<suffix>.onnx`` inside it (created if missing). The
    output's own ``<out>.data`` (written past 2 GB) is checked the same way."""
    src, text = Path(input_path), os.fspath(output_path)
    dst = Path(text)
    if suffix is not None and (text.endswith(("/", os.sep)) or dst.is_dir()):
        dst = dst / default_output(src, suffix).name
    elif text.endswith(("/", os.sep)):
        raise InputError(f"{text}: names a directory; give a file name", option="output")
    targets = (dst, dst.with_name(f"{dst.name}.data"))
    # only an existing file can be damaged: read the input's references only then
    protected = input_files(src) if any(t.exists() for t in targets) else [src]
    for target in targets:
        for p in protected:
            if _same(target, p):
                what = ("the input file" if p == protected[0]
                        else f"a file the input reads ({p.name}, its external data)")
                name = "output path" if target == dst else f"the output's external data {target.name}"
                raise InputError(f"{target}: {name} is {what}; choose another output",
                                 option="output")
    _check_writable_target(dst)
    if dst.exists() and not force:
        raise InputError(f"{dst}: output exists", option="force")
    return dst


def _same(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def input_files(path: str | os.PathLike) -> list[Path]:
    """The model file and every external-data file its tensors reference (read from the graph
    without loading the data; only for a regular file, so a FIFO is never opened)."""
    path = Path(path)
    files = [path]
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return files
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: load() reports it later
        return files
    base = path.parent
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                f = base / location
                if f not in files:
                    files.append(f)
    return files


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from (s.values for s in graph.sparse_initializer)
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
