"""Latency and throughput of one or two models in one runtime, measured the same way.

``bench(models, runtime=..., batches=(1, 32))``: for each batch size, seeded random inputs of
the models' input shapes (the symbolic batch axis set to the batch size; any other symbolic
dimension must be given in ``input_shapes``), ``warmup`` untimed calls of each model, then
``rounds`` rounds of one timed call per model, alternating (the order flips every round), so
a busy neighbour on a shared machine slows every model alike. Per model: median, quartiles,
min and max seconds per call and samples/s (batch / median); with two models the speed-up of
the second over the first (first median / second median: > 1 means the second is faster).
No number is meaningful across machines: print it with :func:`onnxrep.cpu.cpu_info`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnxrep.errors import InputError
from onnxrep.ir.model import load
from onnxrep.runtime import ModelLike, Session, session
from onnxrep.verify import input_specs, random_inputs

DEFAULT_BATCHES = (1, 32)
DEFAULT_ROUNDS = 100


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one model at one batch size, over the timed rounds."""

    calls: int
    median: float
    q1: float
    q3: float
    min: float
    max: float
    batch: int

    @property
    def samples_per_second(self) -> float:
        return self.batch / self.median if self.median > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "samples_per_second": self.samples_per_second}


@dataclass(frozen=True)
class BatchResult:
    batch: int
    shapes: dict[str, tuple[int, ...]]
    timings: tuple[Timing, ...]  # one per model, in the order given

    @property
    def speedup(self) -> float | None:
        """First model's median / second's (> 1: the second is faster); None for one model."""
        if len(self.timings) < 2:
            return None
        return self.timings[0].median / self.timings[1].median

    def as_dict(self) -> dict:
        return {"batch": self.batch, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "timings": [t.as_dict() for t in self.timings], "speedup": self.speedup}


@dataclass(frozen=True)
class BenchResult:
    runtime: str
    threads: int
    rounds: int
    warmup: int
    models: tuple[str, ...]
    results: tuple[BatchResult, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"runtime": self.runtime, "threads": self.threads, "rounds": self.rounds,
                "warmup": self.warmup, "models": list(self.models),
                "results": [r.as_dict() for r in self.results]}


def summarize(times: Sequence[float], batch: int) -> Timing:
    """Median, quartiles (inclusive method), min and max of per-call seconds."""
    if not times:
        raise ValueError("no timed calls")
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(len(ordered), statistics.median(ordered), q1, q3, ordered[0], ordered[-1],
                  batch)


def alternate(calls: Sequence[Callable[[], object]], rounds: int, warmup: int,
              clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per call of each of ``calls``: ``warmup`` untimed calls each, then ``rounds``
    rounds of one call each, the order reversed every other round."""
    if rounds < 1 or warmup < 0:
        raise InputError(f"rounds must be >= 1 and warm-up >= 0 (got {rounds}, {warmup})")
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for r in range(rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            start = clock()
            calls[i]()
            times[i].append(clock() - start)
    return times


# ---- inputs -----------------------------------------------------------------------------------

def input_shapes(model: onnx.ModelProto, batch: int,
                 overrides: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, tuple]:
    """Concrete input shapes at ``batch``: a symbolic (or 0) axis 0 becomes ``batch``; an
    override gives the other dims (its axis 0 is replaced by ``batch`` when the model's axis 0
    is symbolic); any other symbolic dim without an override is an InputError."""
    overrides = dict(overrides or {})
    if batch < 1:
        raise InputError(f"--batch must be >= 1, not {batch}")
    shapes = {}
    for spec in input_specs(model):
        dims = list(spec.shape)
        given = overrides.pop(spec.name, None)
        if given is not None:
            if len(given) != len(dims) or any(isinstance(d, int) and d > 0 and d != g
                                              for i, (d, g) in enumerate(zip(dims, given))
                                              if i > 0):
                raise InputError(f"--input-shape {spec.name}:{_fmt(given)} does not fit the "
                                 f"model's {_fmt(dims)}")
            dims = [dims[0]] + list(given[1:]) if dims else list(given)
        if not dims:
            shapes[spec.name] = ()
            continue
        if isinstance(dims[0], int) and dims[0] > 0:
            if dims[0] != batch:
                raise InputError(f"input '{spec.name}' has a fixed batch dimension {dims[0]}; "
                                 f"--batch {batch} does not fit it")
        else:
            dims[0] = batch
        symbolic = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        if symbolic:
            raise InputError(f"input '{spec.name}' has symbolic dimension(s) "
                             f"{', '.join(str(spec.shape[i]) for i in symbolic)} besides the "
                             f"batch; give --input-shape {spec.name}:{_example(dims)}")
        shapes[spec.name] = tuple(int(d) for d in dims)
    if overrides:
        raise InputError(f"--input-shape names unknown input(s): {', '.join(overrides)}; "
                         f"inputs are: {', '.join(shapes)}")
    return shapes


def _check_same_inputs(first: onnx.ModelProto, other: onnx.ModelProto, label: str) -> None:
    a = {s.name: s for s in input_specs(first)}
    b = {s.name: s for s in input_specs(other)}
    if sorted(a) != sorted(b):
        raise InputError(f"{label}'s inputs ({', '.join(sorted(b))}) differ from the first "
                         f"model's ({', '.join(sorted(a))})")
    for name, spec in a.items():
        if spec.dtype != b[name].dtype or len(spec.shape) != len(b[name].shape):
            raise InputError(f"input '{name}' is {_kind(b[name])} in {label} but "
                             f"{_kind(spec)} in the first model")


def _kind(spec) -> str:
    return f"{np.dtype(spec.dtype).name}[{_fmt(spec.shape)}]"


def _fmt(shape) -> str:
    return "x".join("?" if not (isinstance(d, int) and d > 0) else str(d) for d in shape)


def _example(dims) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in dims)


# ---- the benchmark ----------------------------------------------------------------------------

def default_batches(model: onnx.ModelProto) -> tuple[int, ...]:
    """DEFAULT_BATCHES, or the model's own batch size when its first input fixes it."""
    specs = input_specs(model)
    if specs and specs[0].shape and isinstance(specs[0].shape[0], int) \
            and specs[0].shape[0] > 0:
        return (specs[0].shape[0],)
    return DEFAULT_BATCHES


def bench(models: Sequence[ModelLike], *, runtime: str = "onnxruntime",
          batches: Sequence[int] | None = None, threads: int = 0,
          rounds: int = DEFAULT_ROUNDS, warmup: int | None = None,
          shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0,
          labels: Sequence[str] | None = None, sessions: Sequence[Session] | None = None,
          ) -> BenchResult:
    """Time one or two models (paths or ModelProtos) at each batch size (see module doc;
    default: 1 and 32, or the first model's fixed batch size).

    ``warmup``: untimed calls per model and batch size before timing (default
    max(3, rounds // 10)). ``sessions``: already built sessions of ``models`` (to reuse)."""
    if not 1 <= len(models) <= 2:
        raise InputError(f"bench takes one or two models, not {len(models)}")
    warmup = max(3, rounds // 10) if warmup is None else warmup
    protos = [m if isinstance(m, onnx.ModelProto) else load(m) for m in models]
    batches = default_batches(protos[0]) if batches is None else tuple(batches)
    if not batches:
        raise InputError("give at least one --batch")
    labels = list(labels or [_label(m, i) for i, m in enumerate(models)])
    for proto, label in zip(protos[1:], labels[1:]):
        _check_same_inputs(protos[0], proto, label)
    per_batch = [input_shapes(protos[0], b, shapes) for b in batches]  # errors before sessions
    for proto in protos[1:]:
        for b in batches:
            input_shapes(proto, b, shapes)
    if sessions is None:
        sessions = [session(m, runtime, threads=threads) for m in models]
    results = []
    for batch, batch_shapes in zip(batches, per_batch):
        feeds = random_inputs(protos[0], batch_shapes, seed)
        calls = [(lambda s=s: s.run(feeds)) for s in sessions]
        times = alternate(calls, rounds, warmup)
        results.append(BatchResult(batch, batch_shapes,
                                   tuple(summarize(t, batch) for t in times)))
    return BenchResult(runtime, threads, rounds, warmup, tuple(labels), tuple(results))


def _label(model: ModelLike, index: int) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or f"model{index + 1}"
    return Path(model).name
