"""Per-channel statistics of chosen tensors, gathered through onnxruntime in one streaming pass.

For every tensor T (axis 1 = channel; every other axis is reduced) a copy of the graph gets

    R = Reshape(T, [0, 0, -1])          # [N, C, L]
    D = R - K                           # K: per-channel shift, the first sample's channel means
    S1 = ReduceSum(D, 2), S2 = ReduceSum(D * D, 2), lo = ReduceMin(R, 2), hi = ReduceMax(R, 2)

as extra outputs, so only 4 * N * C numbers per tensor leave onnxruntime and the session keeps
its graph optimizations (requested outputs are never fused away); onnxruntime's
ReduceSumSquare measured 2-4x slower than Mul + ReduceSum here. Per row (sample n, channel c,
L elements): mean = K + S1 / L, M2 = S2 - S1^2 / L in float64; the shift keeps that
subtraction well conditioned when |mean| >> std. Rows, batches and shards are merged with the
parallel formula of Chan, Golub and LeVeque:

    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,
    M2 = M2_a + M2_b + d^2 * na * nb / n,  var = M2 / n

which is exact algebra, so statistics of shards merge to those of a single pass and the
calibration can be split across processes (``workers``). Memory holds one batch whatever the
number of samples.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxrep import verify
from onnxrep.data import as_dataset
from onnxrep.errors import DataError, UnsupportedModelError
from onnxrep.ir.graph import GraphIndex, unique_name
from onnxrep.ir.model import opset_version, write_to
from onnxrep.progress import Progress
from onnxrep.ir.shapes import infer_types

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DIRECT = (TensorProto.FLOAT, TensorProto.DOUBLE)
_WIDENED = (TensorProto.FLOAT16, TensorProto.BFLOAT16)  # reduced in float32
_PREFIX = "onnxrep_stats"


@dataclass
class ChannelStats:
    """Moments of one tensor per channel: ``count`` elements per channel, ``mean``, ``m2``
    (sum of squared deviations), ``min``, ``max``; float64 arrays of one value per channel."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    @property
    def var(self) -> np.ndarray:
        """Population variance (divided by ``count``), as BatchNormalization uses."""
        return self.m2 / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @classmethod
    def of(cls, array: np.ndarray) -> "ChannelStats":
        """Reference statistics of a whole array (two-pass, float64)."""
        x = np.asarray(array, np.float64)
        if x.ndim < 2:
            raise ValueError("need an array with a channel axis (axis 1)")
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        mean = x.mean(axis=1)
        return cls(x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(axis=1), x.min(axis=1),
                   x.max(axis=1))

    @classmethod
    def from_rows(cls, s1: np.ndarray, s2: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  length: int, shift: np.ndarray) -> "ChannelStats":
        """Merge [N, C] row sums of shifted values (each row ``length`` elements)."""
        s1 = np.asarray(s1, np.float64)
        s2 = np.asarray(s2, np.float64)
        row_mean = s1 / length
        row_m2 = np.maximum(s2 - s1 * row_mean, 0.0)
        mean = row_mean.mean(axis=0)  # rows hold equal counts
        m2 = row_m2.sum(axis=0) + length * ((row_mean - mean) ** 2).sum(axis=0)
        return cls(s1.shape[0] * length, np.asarray(shift, np.float64) + mean, m2,
                   np.asarray(lo, np.float64).min(axis=0), np.asarray(hi, np.float64).max(axis=0))

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Statistics of both sets together (Chan et al.); neither operand is modified."""
        if self.channels != other.channels:
            raise DataError(f"a tensor has {self.channels} channels in one batch and "
                            f"{other.channels} in another")
        na, nb = self.count, other.count
        if na == 0 or nb == 0:
            return other if na == 0 else self
        n = na + nb
        delta = other.mean - self.mean
        return ChannelStats(n, self.mean + delta * (nb / n),
                            self.m2 + other.m2 + delta**2 * (na * nb / n),
                            np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    def scaled(self, k: np.ndarray) -> "ChannelStats":
        """Statistics of the tensor times ``k`` > 0 per channel (exact: moments scale)."""
        k = np.asarray(k, np.float64)
        return ChannelStats(self.count, self.mean * k, self.m2 * k * k, self.min * k,
                            self.max * k)

    def as_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "var": self.var.tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}


@dataclass
class Statistics:
    """``tensors``: name -> :class:`ChannelStats`; ``skipped``: name -> why it has none;
    ``outputs``: the model's own outputs of the first batches, in data order, when
    :func:`collect_statistics` was asked to keep them (``keep_outputs``)."""

    tensors: dict[str, ChannelStats] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)

    def __getitem__(self, name: str) -> ChannelStats:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> ChannelStats | None:
        return self.tensors.get(name)

    def rescaled(self, factors: dict[str, np.ndarray]) -> "Statistics":
        """The statistics after a pass multiplied tensors' channels by positive ``factors``
        (tensor -> one factor per channel); other tensors unchanged."""
        tensors = {name: s.scaled(factors[name]) if name in factors else s
                   for name, s in self.tensors.items()}
        return Statistics(tensors, self.samples, self.batches, dict(self.skipped))

    def merge(self, other: "Statistics") -> "Statistics":
        tensors = dict(self.tensors)
        for name, s in other.tensors.items():
            tensors[name] = tensors[name].merge(s) if name in tensors else s
        skipped = {**self.skipped, **other.skipped}
        return Statistics(tensors, self.samples + other.samples, self.batches + other.batches,
                          {k: v for k, v in skipped.items() if k not in tensors})


def layer_outputs(model: onnx.ModelProto) -> list[str]:
    """First outputs of every Conv, ConvTranspose, Gemm and MatMul: the pre-activations."""
    return [n.output[0] for n in model.graph.node
            if n.domain in ("", "ai.onnx") and n.op_type in LAYER_OPS and n.output]


def collect_statistics(model: onnx.ModelProto, data, tensors: Iterable[str] | None = None, *,
                       workers: int = 1, optimized: bool = True,
                       batch_size: int | None = None, keep_outputs: int = 0) -> Statistics:
    """Per-channel mean, variance, min and max of ``tensors`` (default :func:`layer_outputs`)
    over every sample of ``data`` (a Dataset or anything ``load_data`` takes).

    ``keep_outputs``: bytes of the model's own outputs to keep (``Statistics.outputs``, per
    batch from the first, as long as the next batch fits): the run computes them anyway, so a
    later comparison with this model over the same data need not run it again.

    ``workers`` > 1 spreads the batches over that many processes (onnxruntime threads are
    divided between them); the result is the Chan merge of the per-batch statistics in data
    order, equal to a single-process run up to float64 rounding. ``model`` is not mutated.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    dataset = as_dataset(data, model, batch_size=batch_size)
    names = list(dict.fromkeys(tensors if tensors is not None else layer_outputs(model)))
    probe, plan, skipped = _probe_model(model, names)
    result = Statistics(skipped=skipped)
    if not plan:
        for _ in dataset.batches():  # still validates the data, like a real pass would
            pass
        return result
    with _Runner(probe, workers, optimized) as runner, \
            Progress(getattr(dataset, "num_samples", None), "statistics") as bar:
        batches = dataset.batches()
        first = next(batches, None)
        if first is None:
            raise DataError("the calibration data holds no samples")
        zero = {p.shift: np.zeros((1, 1), p.dtype) for p in plan}
        shifts = _shifts(plan, runner.run(_head(first, model), zero))
        rows = _Rows(plan, shifts, result)
        own = [o.name for o in model.graph.output]
        for feeds, raw in runner.map(_chain(first, batches), shifts):
            rows.add(raw, _rows(feeds))
            if keep_outputs and len(result.outputs) == result.batches - 1:
                kept = {o: raw[o] for o in own}
                keep_outputs -= sum(v.nbytes for v in kept.values())
                if keep_outputs >= 0:
                    result.outputs.append(kept)
            bar.update(_rows(feeds))
        rows.flush()
    return result


@dataclass(frozen=True)
class ActivationRange:
    """How per-tensor INT8 quantization (min/max with 0 included, 256 levels) treats one
    layer's output: ``width`` = the tensor's range, ``median_width`` = the median range of its
    live channels, ``ratio`` = width / median_width, ``dead`` = channels that are always 0 (or
    never reach above 0 before a ReLU), ``coarse`` = live channels spanning fewer than 16 of
    the 256 levels. Ranges are taken after the ReLU when one alone reads the output, as
    onnxruntime folds it into the quantized Conv."""

    node: str
    op: str
    tensor: str
    lo: float
    hi: float
    median_width: float
    channels: int
    dead: int
    coarse: int
    relu: bool

    @property
    def width(self) -> float:
        return self.hi - self.lo

    @property
    def ratio(self) -> float:
        return self.width / self.median_width if self.median_width > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__},
                "width": self.width, "ratio": self.ratio}


COARSE_LEVELS = 16


def activation_ranges(model: onnx.ModelProto, stats: Statistics) -> list[ActivationRange]:
    """One :class:`ActivationRange` per measured weight-layer output, in graph order."""
    index = GraphIndex(model.graph)
    rows = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in LAYER_OPS or not node.output or node.output[0] not in stats:
            continue
        s = stats[node.output[0]]
        readers = index.readers(node.output[0])
        relu = len(readers) == 1 and index.node(readers[0]).op_type == "Relu"
        lo = np.zeros(s.channels) if relu else np.minimum(s.min, 0.0)
        hi = np.maximum(s.max, 0.0)
        widths = hi - lo
        live = widths > 0
        lo_t, hi_t = float(lo.min(initial=0.0)), float(hi.max(initial=0.0))
        step = (hi_t - lo_t) / 255
        rows.append(ActivationRange(
            index.labels[i], node.op_type, node.output[0], lo_t, hi_t,
            float(np.median(widths[live])) if live.any() else 0.0, s.channels,
            int((~live).sum()), int((live & (widths < COARSE_LEVELS * step)).sum()), relu))
    return rows


# ---- the probe graph --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Probe:
    tensor: str
    shift: str  # graph input name of K
    outputs: tuple[str, str, str, str, str]  # S1, S2, min, max, shape of R
    dtype: np.dtype  # compute dtype


def _probe_model(model: onnx.ModelProto, names: list[str]
                 ) -> tuple[onnx.ModelProto, list[_Probe], dict[str, str]]:
    """A copy of ``model`` with the reduction nodes and outputs; tensors it cannot reduce are
    returned with the reason."""
    index = GraphIndex(model.graph)
    types, ranks = _tensor_types(model)
    available = set(index.producer) | index.graph_inputs
    taken = set(available) | set(index.initializers) | {n.name for n in model.graph.node}
    opset = opset_version(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    nodes, plan, skipped = [], [], {}
    axes = unique_name(f"{_PREFIX}_axes", taken)
    shape = unique_name(f"{_PREFIX}_shape", taken)
    graph.initializer.extend([numpy_helper.from_array(np.array([2], np.int64), axes),
                              numpy_helper.from_array(np.array([0, 0, -1], np.int64), shape)])
    for k, name in enumerate(names):
        elem = types.get(name)
        if index.is_const(name):
            skipped[name] = "it is a constant"
        elif name not in available:
            skipped[name] = "no node produces it and it is not a graph input"
        elif elem is not None and elem not in _DIRECT + _WIDENED:
            skipped[name] = f"it is not a float tensor ({TensorProto.DataType.Name(elem)})"
        elif ranks.get(name) is not None and ranks[name] < 2:
            skipped[name] = f"it has rank {ranks[name]}, no channel axis"
        else:
            plan.append(_add_probe(nodes, graph, name, k, elem, axes, shape, opset, taken))
    graph.node.extend(nodes)
    for p in plan:
        graph.output.extend(helper.make_empty_tensor_value_info(o) for o in p.outputs)
    return probe, plan, skipped


def _add_probe(nodes: list, graph: onnx.GraphProto, name: str, k: int, elem: int | None,
               axes: str, shape: str, opset: int, taken: set) -> _Probe:
    pre = f"{_PREFIX}{k}"
    new = {s: unique_name(f"{pre}_{s}", taken) for s in
           ("cast", "r", "k", "d", "sq", "sum", "sumsq", "min", "max", "dims")}
    src = name
    if elem in _WIDENED:
        nodes.append(helper.make_node("Cast", [name], [new["cast"]], to=TensorProto.FLOAT))
        src = new["cast"]
    compute = TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT
    graph.input.append(helper.make_tensor_value_info(new["k"], compute, [f"{pre}_C", 1]))
    nodes.append(helper.make_node("Reshape", [src, shape], [new["r"]]))
    nodes.append(helper.make_node("Sub", [new["r"], new["k"]], [new["d"]]))
    nodes.append(_reduce("ReduceSum", new["d"], new["sum"], axes, opset, 13))
    nodes.append(helper.make_node("Mul", [new["d"], new["d"]], [new["sq"]]))
    nodes.append(_reduce("ReduceSum", new["sq"], new["sumsq"], axes, opset, 13))
    for op, out in (("ReduceMin", new["min"]), ("ReduceMax", new["max"])):
        nodes.append(_reduce(op, new["r"], out, axes, opset, 18))
    nodes.append(helper.make_node("Shape", [new["r"]], [new["dims"]]))
    outputs = (new["sum"], new["sumsq"], new["min"], new["max"], new["dims"])
    return _Probe(name, new["k"], outputs, helper.tensor_dtype_to_np_dtype(compute))


def _reduce(op: str, x: str, out: str, axes: str, opset: int, axes_input_since: int):
    """A reduction over axis 2, axes as an input or an attribute depending on the opset."""
    if opset >= axes_input_since:
        return helper.make_node(op, [x, axes], [out], keepdims=0)
    return helper.make_node(op, [x], [out], axes=[2], keepdims=0)


def _tensor_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element types and ranks, declared or inferred."""
    inferred = infer_types(model)
    types = {name: elem for name, (elem, _) in inferred.items()}
    ranks = {name: len(shape) for name, (_, shape) in inferred.items() if shape is not None}
    return types, ranks


# ---- running ----------------------------------------------------------------------------------

def _rows(feeds: dict) -> int:
    return len(next(iter(feeds.values())))


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _head(feeds: dict, model: onnx.ModelProto) -> dict:
    """The first sample of a batch, or the whole batch when the model fixes its size: enough to
    place the shift K near the data (it only conditions the sums), at a sample's cost."""
    if any(isinstance(s.shape[0], int) and s.shape[0] > 0 for s in verify.input_specs(model)
           if s.shape):
        return feeds
    return {name: value[:1] if np.ndim(value) else value for name, value in feeds.items()}


def _shifts(plan: list[_Probe], raw: dict) -> dict[str, np.ndarray]:
    """K per tensor: the channel means of the first sample (computed unshifted)."""
    shifts = {}
    for p in plan:
        s1, _, _, _, dims = (raw[o] for o in p.outputs)
        length = max(int(dims[2]), 1)
        mean = np.asarray(s1, np.float64).mean(axis=0) / length
        shifts[p.shift] = np.where(np.isfinite(mean), mean, 0.0).astype(p.dtype)[:, None]
    return shifts


class _Rows:
    """Per-row sums of every tensor, buffered and merged into ``stats`` in blocks of up to
    ``limit`` numbers: numpy then works on large blocks (per-batch merging cost more than the
    onnxruntime run on small models) while memory stays bounded. Rows of one block share
    their length L; inputs of varying size start a block per length."""

    def __init__(self, plan: list[_Probe], shifts: dict, stats: Statistics,
                 limit: int = 1 << 20):
        self.plan, self.shifts, self.stats, self.limit = plan, shifts, stats, limit
        self.buffer: dict[tuple[str, int], list[tuple]] = {}
        self.size = 0

    def add(self, raw: dict, rows: int) -> None:
        for p in self.plan:
            s1, s2, lo, hi, dims = (raw[o] for o in p.outputs)
            length = int(dims[2])
            if length == 0:
                self.stats.skipped.setdefault(p.tensor, "it is empty")
                continue
            if s1.shape[1] != self.shifts[p.shift].shape[0]:
                raise DataError(f"tensor '{p.tensor}' has {self.shifts[p.shift].shape[0]} "
                                f"channels in the first batch and {s1.shape[1]} in a later one")
            self.buffer.setdefault((p.tensor, length), []).append((s1, s2, lo, hi))
            self.size += 4 * s1.size
        self.stats.samples += rows
        self.stats.batches += 1
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        shift = {p.tensor: self.shifts[p.shift][:, 0] for p in self.plan}
        for (tensor, length), parts in self.buffer.items():
            block = ChannelStats.from_rows(*(np.concatenate(a) for a in zip(*parts)), length,
                                           shift[tensor])
            have = self.stats.tensors.get(tensor)
            self.stats.tensors[tensor] = block if have is None else have.merge(block)
            self.stats.skipped.pop(tensor, None)
        self.buffer, self.size = {}, 0


class _Runner:
    """Runs the probe model in-process (``workers`` == 1) or in a pool of processes."""

    def __init__(self, probe: onnx.ModelProto, workers: int, optimized: bool):
        self.workers, self.optimized = workers, optimized
        self._tmp = None
        if workers == 1:
            self._session = _session(probe, optimized, threads=0)
            self._pool = None
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxrep-stats-")
        path = Path(self._tmp.name) / "probe.onnx"
        write_to(probe, path)
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init, initargs=(str(path), optimized, threads))

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    def run(self, feeds: dict, shifts: dict) -> dict:
        if self._pool is None:
            return verify.run(self._session, {**feeds, **shifts})
        return self._pool.submit(_worker_run, feeds, shifts).result()

    def map(self, batches: Iterator[dict], shifts: dict) -> Iterator[tuple[dict, dict]]:
        """(feeds, outputs) in data order; at most 2 batches per worker in flight."""
        if self._pool is None:
            for feeds in batches:
                yield feeds, self.run(feeds, shifts)
            return
        pending: deque = deque()
        for feeds in batches:
            pending.append((feeds, self._pool.submit(_worker_run, feeds, shifts)))
            if len(pending) >= 2 * self.workers:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()


def _session(model: onnx.ModelProto | str, optimized: bool, threads: int):
    """An onnxruntime session with graph optimizations on when asked (off if they fail);
    ``threads`` > 0 fixes the intra-op thread count (pool workers share the cores)."""
    import onnxruntime as ort

    if threads == 0:
        if optimized:
            try:
                return verify.session(model, optimized=True)
            except UnsupportedModelError:
                pass
        return verify.session(model, optimized=False)
    error = None
    for level in ([ort.GraphOptimizationLevel.ORT_ENABLE_ALL] if optimized else []) + [
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL]:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = level
        try:
            return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - reported below as one line
            error = exc
    raise UnsupportedModelError(f"onnxruntime cannot load the statistics model: "
                                f"{str(error).strip().splitlines()[0]}")


_WORKER_SESSION = None


def _worker_init(path: str, optimized: bool, threads: int) -> None:
    global _WORKER_SESSION
    _WORKER_SESSION = _session(path, optimized, threads)


def _worker_run(feeds: dict, shifts: dict) -> dict:
    return verify.run(_WORKER_SESSION, {**feeds, **shifts})
