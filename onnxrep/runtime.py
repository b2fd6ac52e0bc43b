"""One way to run an ONNX model in onnxruntime or OpenVINO: ``session(model, runtime, threads)``
and ``Session.run(feeds) -> list[np.ndarray]`` (outputs in the graph's order).

onnxruntime: CPUExecutionProvider, all graph optimizations, ``threads`` intra-op threads
(0: its default), no spin-waiting (an idle session's spinning threads would take the core an
alternating benchmark call needs).

OpenVINO (``pip install 'onnxrep[openvino]'``, imported only when asked for): the CPU plugin
reads the ONNX file and compiles one network per input shape seen (reshaped to static
shapes, cached), with ``INFERENCE_NUM_THREADS`` = ``threads``, one stream, the latency hint, no
CPU pinning and
``INFERENCE_PRECISION_HINT`` = f32 by default: on CPUs with AVX512_BF16 or AMX, OpenVINO's
default is bf16, which would make its "FP32" baseline a bf16 one (``precision="bf16"`` or
``None`` keeps the plugin's choice). QuantizeLinear/DequantizeLinear pairs become FakeQuantize
and the plugin runs int8 kernels where its low-precision transformations match them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from onnxrep.errors import InputError, UnsupportedModelError

RUNTIMES = ("onnxruntime", "openvino")
ModelLike = onnx.ModelProto | str | os.PathLike


class Session:
    """A compiled model: ``input_names``, ``output_names``, ``run(feeds)``."""

    runtime = ""
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def run_dict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(feeds)))

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Do the one-time work for these input shapes now (OpenVINO compiles per shape), so
        that timing ``run`` measures inference only."""


def session(model: ModelLike, runtime: str = "onnxruntime", *, threads: int = 0,
            precision: str | None = "f32") -> Session:
    """A session of ``model`` (a path or a ModelProto) in ``runtime``.

    ``threads``: intra-op threads, 0 for the runtime's default. ``precision``: OpenVINO's
    inference precision hint ("f32", "bf16", or None for the plugin's default); ignored by
    onnxruntime."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime '{runtime}': expected {' or '.join(RUNTIMES)}")
    if threads < 0:
        raise InputError(f"threads must be >= 0, not {threads}")
    if runtime == "onnxruntime":
        return OrtSession(model, threads)
    return OpenVINOSession(model, threads, precision)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _ModelFile:
    """A path for ``model``: the path itself, or a temporary file holding the proto (kept as
    long as this object lives: OpenVINO may read weights lazily)."""

    def __init__(self, model: ModelLike):
        if isinstance(model, onnx.ModelProto):
            from onnxrep.ir.model import write_to

            folder = tempfile.mkdtemp(prefix="onnxrep-rt-")
            weakref.finalize(self, shutil.rmtree, folder, True)  # removed with this object
            self.path = Path(folder) / "model.onnx"
            write_to(model, self.path)
        else:
            self.path = Path(model)
            if not self.path.is_file():
                raise InputError(f"{self.path}: no such file")


class OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(self, model: ModelLike, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            if isinstance(model, onnx.ModelProto):
                from onnxrep.ir.model import serialize

                data = serialize(model)
                if data is None:  # past 2 GB: through a file with external data
                    self._file = _ModelFile(model)
                    data = str(self._file.path)
            else:
                data = str(_ModelFile(model).path)
            self.sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except InputError:
            raise
        except Exception as exc:
            raise UnsupportedModelError(
                f"onnxruntime cannot load the model: {_first_line(exc)}") from None
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.sess.run(self.output_names, dict(feeds))
        except Exception as exc:
            raise UnsupportedModelError(
                f"onnxruntime failed to run the model: {_first_line(exc)}") from None


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise InputError("the openvino runtime needs the openvino package: "
                         "pip install 'onnxrep[openvino]'") from None
    return openvino


class OpenVINOSession(Session):
    runtime = "openvino"

    def __init__(self, model: ModelLike, threads: int = 0, precision: str | None = "f32"):
        ov = import_openvino()
        self._ov = ov
        self._file = _ModelFile(model)
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(self._file.path))
        except Exception as exc:
            raise UnsupportedModelError(
                f"openvino cannot load the model: {_first_line(exc)}") from None
        # no pinning: with pinned threads, two compiled models timed alternately on a busy
        # 2-core machine ran 2x slower and 3x noisier (FP32 RepVGG at batch 32: IQR 4.0-7.1 ms
        # pinned, 1.8-6.2 ms not; 1.75-2.3 ms with one thread)
        self.config = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                       "ENABLE_CPU_PINNING": False}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if precision:
            self.config["INFERENCE_PRECISION_HINT"] = precision
        self.input_names = [i.get_any_name() for i in self.model.inputs]
        # the ONNX graph's output names, in its order (OpenVINO keeps the order)
        self.output_names = [o.get_any_name() for o in self.model.outputs]
        self._compiled: dict[tuple, tuple] = {}

    def compiled(self, shapes: Mapping[str, tuple]):
        """(compiled model, infer request) for these static input shapes, compiled once."""
        key = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
        if key not in self._compiled:
            model = self.model.clone()
            try:
                model.reshape({name: self._ov.PartialShape(list(shape))
                               for name, shape in shapes.items()})
                compiled = self.core.compile_model(model, "CPU", self.config)
            except Exception as exc:
                raise UnsupportedModelError(
                    f"openvino cannot compile the model: {_first_line(exc)}") from None
            self._compiled[key] = (compiled, compiled.create_infer_request())
        return self._compiled[key]

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        self.compiled({k: np.shape(v) for k, v in feeds.items()})

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise InputError(f"unknown input(s) {', '.join(sorted(unknown))}; inputs are: "
                             f"{', '.join(self.input_names)}")
        compiled, request = self.compiled({k: np.shape(v) for k, v in feeds.items()})
        try:
            request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except Exception as exc:
            raise UnsupportedModelError(
                f"openvino failed to run the model: {_first_line(exc)}") from None
        # the request reuses its output buffers: copy
        return [np.array(request.get_output_tensor(i).data, copy=True)
                for i in range(len(compiled.outputs))]
