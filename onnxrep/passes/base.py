"""The pass contract, and the manager that runs passes and verifies each by its contract.

A pass is called on a ``ModelProto`` and *mutates it in place*, returning a
:class:`PassResult` that lists what it changed, what it skipped and why, and a typed summary
of its own. Public API functions copy their input once before running passes, so callers never
see their model mutated. ``contract`` states what a pass promises about the model's function,
and therefore how :class:`Verifier` checks it:

- ``EQUIVALENT``: the same function on every input up to float rounding; checked on seeded
  inputs of the model's own shapes (or the first calibration batch when data is given);
- ``EQUIVALENT_ON_DATA``: exact wherever the pass's statistics hold; checked on those inputs
  and, when the data can be read again, over all of the calibration data;
- ``APPROXIMATE``: changes the function on purpose (bias correction); not checked here.

:class:`PassManager` runs stages in order. A stage builds its pass from the model as the
earlier passes left it and from statistics asked of :class:`StatisticsCache`, which collects
them once per model state: a later stage asking for tensors already measured on an unchanged
model gets them without another run over the data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import onnx

from onnxrep import verify
from onnxrep.errors import VerificationError
from onnxrep.verify.streaming import DataCheck, compare_on_data


class Contract(enum.Enum):
    EQUIVALENT = "equivalent"  # same function on every input, up to float rounding
    EQUIVALENT_ON_DATA = "equivalent on calibration data"  # exact where the statistics hold
    APPROXIMATE = "approximate"  # changes the function on purpose (e.g. bias correction)


@dataclass(frozen=True)
class Change:
    """Something a pass did, e.g. ``Change("equalized", ("conv1", "conv2"), "max |log s| 2.1")``."""

    kind: str
    nodes: tuple[str, ...]
    detail: str = ""


@dataclass(frozen=True)
class Skip:
    """A place a pass looked at and left alone, with the reason."""

    node: str
    reason: str


@dataclass
class PassResult:
    """``model``: the model the pass changed in place (None once a driver let it go, as
    :func:`onnxrep.pipeline.optimize_file` does after writing it); ``summary``: the pass's own
    typed totals (e.g. ``FoldSummary``), or None."""

    model: onnx.ModelProto | None
    changes: list[Change] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    summary: Any = None

    @property
    def modified(self) -> bool:
        return bool(self.changes)


class Pass:
    """Base class: subclasses set ``name`` and ``contract`` and implement ``call``.

    A pass's units are the places it changes, named by the first node of each
    :class:`Change`; :meth:`withhold` makes the pass leave some of them alone (a Skip with the
    given reason instead), which is how the manager rolls back the unit that broke a check."""

    name: str = "pass"
    contract: Contract = Contract.EQUIVALENT
    _withheld: dict[str, str] = {}

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.call(model)

    def statistics_after(self, result: PassResult) -> dict | None:
        """How the pass changed the calibration data's activations: None (unknown: measure
        again), or tensor -> positive per-channel factor, tensors not named being unchanged
        (``{}``: every activation is the same on the calibration data)."""
        return None

    def withhold(self, units: dict[str, str]) -> None:
        """Leave these units (first-node labels) unchanged, each reported with its reason."""
        self._withheld = dict(units)

    def held(self, unit: str) -> Skip | None:
        """The Skip for a withheld unit, or None when the pass may change it."""
        reason = self._withheld.get(unit)
        return None if reason is None else Skip(unit, reason)

    def call(self, model: onnx.ModelProto) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


class StatisticsCache:
    """Per-channel statistics over a dataset, collected once per model state.

    ``get(model, tensors)`` returns statistics of at least ``tensors``; after a pass changes
    the model the manager calls ``update()`` with what the pass says it did to the activations
    (CLE scales channels by known factors; dead-input cleanup leaves every activation the same
    on the data), so statistics are measured again only when a pass cannot say.

    ``keep_outputs``: bytes of graph outputs the first collection keeps as ``recorded`` (per
    batch), while the model is still equivalent to the input for every input (no
    ``EQUIVALENT_ON_DATA`` pass changed it yet): the reference side of the check over the data,
    which then does not run the input model again for those batches."""

    def __init__(self, dataset, collect: Callable | None = None, keep_outputs: int = 0):
        from onnxrep.analysis.statistics import collect_statistics

        self.dataset = dataset
        self._collect = collect or collect_statistics
        self._stats = None
        self._keep = keep_outputs
        self.recorded: list[dict] = []

    def get(self, model: onnx.ModelProto, tensors: Iterable[str]):
        wanted = list(dict.fromkeys(tensors))
        have = [] if self._stats is None else [*self._stats.tensors, *self._stats.skipped]
        if self._stats is None or not set(wanted) <= set(have):
            names = list(dict.fromkeys(have + wanted))
            if self._keep:
                self._stats = self._collect(model, self.dataset, names, keep_outputs=self._keep)
                self.recorded, self._keep = self._stats.outputs, 0
            else:
                self._stats = self._collect(model, self.dataset, names)
        return self._stats

    def invalidate(self) -> None:
        self._stats = None

    def update(self, factors: dict | None, contract: Contract = Contract.EQUIVALENT) -> None:
        """After a pass: rescale what it scaled (``Pass.statistics_after``), or measure anew.
        Once a pass changed the model only on the data, no later collection records outputs."""
        if contract is Contract.EQUIVALENT_ON_DATA:
            self._keep = 0
        if factors is None or self._stats is None:
            self._stats = None
        else:
            self._stats = self._stats.rescaled(factors)


@dataclass(frozen=True)
class Stage:
    """One pass in a pipeline: ``make(model, stats)`` builds it from the current model and the
    :class:`StatisticsCache` (None without data)."""

    name: str
    make: Callable[[onnx.ModelProto, StatisticsCache | None], Pass]


class Verifier:
    """Checks a candidate against the original by the contracts of the passes that made it.

    ``feeds``: the inputs every check runs (seeded inputs, or the first calibration batch);
    ``dataset``: replayable calibration data, over which ``EQUIVALENT_ON_DATA`` passes are
    also compared. ``original`` may be a proto or a path (then onnxruntime reads the file)."""

    def __init__(self, original: verify.ModelLike, feeds: dict, *, rtol: float,
                 bounds: dict[str, float], dataset=None, reference: dict | None = None):
        self.original, self.feeds, self.rtol, self.bounds = original, feeds, rtol, bounds
        self.dataset = dataset
        self.reference = reference if reference is not None else verify.run(original, feeds)
        verify.check_reference(self.reference, "the verification inputs")

    def check(self, candidate: verify.ModelLike, passes: list[Pass], what: str,
              recorded: list[dict] | None = None, *, defer: bool = False
              ) -> tuple[verify.Comparison, verify.Comparison | DataCheck | None]:
        """(comparison on the feeds, comparison over all data or None); raises
        :class:`VerificationError` past ``rtol``. ``recorded``: outputs per batch of the data
        of a model equivalent to the original (:class:`StatisticsCache`), used instead of
        running the original on those batches. ``defer``: return the check over the data as
        a :class:`DataCheck` for the caller to feed with the candidate's outputs instead."""
        comparison = verify.compare_outputs(self.reference, verify.run(candidate, self.feeds),
                                            self.bounds)
        verify.check(comparison, self.rtol, what)
        if self.dataset is None or not any(
                p.contract is Contract.EQUIVALENT_ON_DATA for p in passes):
            return comparison, None
        if defer:
            return comparison, DataCheck(self.original, self.dataset, rtol=self.rtol, what=what,
                                         recorded=recorded)
        return comparison, compare_on_data(self.original, candidate, self.dataset,
                                           rtol=self.rtol, what=what, recorded=recorded)


@dataclass
class Run:
    """What a manager run did: ``results`` as (pass name, result) in order, the passes that
    changed the model, the last comparison on the verification inputs, and the last comparison
    over all calibration data (None when no data-dependent pass changed the model or it was
    not checked)."""

    results: list[tuple[str, PassResult]] = field(default_factory=list)
    changed: list[Pass] = field(default_factory=list)
    comparison: verify.Comparison | None = None
    data_comparison: verify.Comparison | None = None


class PassManager:
    """Runs ``stages`` in order on a model, in place.

    With a ``verifier`` and ``check_each`` the model is checked after every pass that changed
    it, so a failure names its pass; a data check made stale by a later pass is repeated at the
    end. When a pass fails its check, the manager rolls back only the units that break it
    (bisecting over the pass's changes from a copy of the model before the pass) and keeps the
    rest, each rolled-back unit a Skip with the error it caused, unless ``strict`` (the
    default for single-pass commands, whose whole job is that pass) raises instead.
    Without ``check_each`` the caller verifies once (e.g. the file it wrote) through
    :meth:`verify_result`. ``observe(name, result, model)`` is called after each stage with
    the model as that stage left it."""

    def __init__(self, stages: list[Stage], *, verifier: Verifier | None = None,
                 stats: StatisticsCache | None = None, check_each: bool = True,
                 strict: bool = True, progress: Callable[[str], None] | None = None,
                 observe: Callable[[str, PassResult, onnx.ModelProto], None] | None = None):
        self.stages, self.verifier, self.stats = stages, verifier, stats
        self.check_each, self.strict, self.progress = check_each, strict, progress
        self.observe = observe

    def run(self, model: onnx.ModelProto) -> Run:
        run = Run()
        stale = False
        checking = self.verifier is not None and self.check_each
        for stage in self.stages:
            if self.progress:
                self.progress(f"{stage.name}...")
            before = None
            if checking and not self.strict:
                before = onnx.ModelProto()
                before.CopyFrom(model)
            p = stage.make(model, self.stats)
            result = p(model)
            if result.modified and checking:
                try:
                    run.comparison, on_data = self._check(model, [p], f"pass '{p.name}'")
                except VerificationError as error:
                    if before is None:
                        raise
                    p, result, (run.comparison, on_data) = self._roll_back(
                        stage, model, before, result, error)
                if result.modified:
                    stale = stale or run.data_comparison is not None
                    if on_data is not None:
                        run.data_comparison, stale = on_data, False
            run.results.append((p.name, result))
            if self.observe is not None:
                self.observe(p.name, result, model)
            if result.modified:
                run.changed.append(p)
                if self.stats is not None:
                    self.stats.update(p.statistics_after(result), p.contract)
        if stale:
            _, run.data_comparison = self._check(model, run.changed, "the passes")
        return run

    def _roll_back(self, stage: Stage, model: onnx.ModelProto, before: onnx.ModelProto,
                   failed: PassResult, error: VerificationError):
        """Find the units whose change breaks the check (adding halves of the pass's units to
        an accepted set, down to single units), and leave ``model`` with the pass applied to
        the accepted units only. Returns (pass, result, comparisons) of that final run."""
        units = list(dict.fromkeys(c.nodes[0] for c in failed.changes))
        accepted: list[str] = []
        rejected: dict[str, str] = {}

        def attempt(keep: list[str]):
            model.CopyFrom(before)
            p = stage.make(model, self.stats)
            p.withhold({u: f"rolled back: {rejected.get(u, 'not tried')}" for u in units
                        if u not in keep})
            result = p(model)
            try:
                return p, result, self._check(model, [p], f"pass '{p.name}'")
            except VerificationError as exc:
                return exc

        def add(part: list[str], known: VerificationError | None = None) -> None:
            outcome = known or attempt(accepted + part)
            if not isinstance(outcome, VerificationError):
                accepted.extend(part)
            elif len(part) == 1:
                rejected[part[0]] = str(outcome)
            else:
                add(part[:len(part) // 2])
                add(part[len(part) // 2:])

        add(units, error)
        final = attempt(accepted)
        if isinstance(final, VerificationError):  # accepted units passed together before
            raise final
        return final

    def verify_result(self, run: Run, candidate: verify.ModelLike, *, defer: bool = False
                      ) -> DataCheck | None:
        """Check ``candidate`` (the run's result, e.g. as written to a file) once, by the
        contracts of every pass that changed it. ``defer``: check the verification inputs now
        and return the check over the data (a :class:`DataCheck`, None when no pass needs one)
        for the caller to complete."""
        names = ", ".join(p.name for p in run.changed) or "(none)"
        run.comparison, on_data = self._check(candidate, run.changed, f"passes {names}",
                                              defer=defer)
        if defer:
            return on_data
        run.data_comparison = on_data
        return None

    def _check(self, candidate: verify.ModelLike, passes: list[Pass], what: str, *,
               defer: bool = False):
        recorded = self.stats.recorded if self.stats is not None else None
        return self.verifier.check(candidate, passes, what, recorded, defer=defer)
