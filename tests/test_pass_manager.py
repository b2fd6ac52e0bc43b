"""PassManager: verification by contract, statistics once per model state, and rollback of the
units of a pass that break its check."""

import numpy as np
import onnx
import pytest

from graphs import Chain
from onnxrep import verify
from onnxrep.errors import VerificationError
from onnxrep.ir.graph import GraphIndex
from onnxrep.passes.base import (Change, Contract, Pass, PassManager, PassResult, Stage,
                                 StatisticsCache, Verifier)


class ScaleWeights(Pass):
    """Scales each Conv's weight by its factor: 1 keeps the function, anything else breaks it."""

    name = "scale"
    contract = Contract.EQUIVALENT

    def __init__(self, factors: dict[str, float]):
        self.factors = factors

    def call(self, model):
        index = GraphIndex(model.graph)
        changes, skips = [], []
        for i, node in enumerate(model.graph.node):
            label = index.labels[i]
            if node.op_type != "Conv" or label not in self.factors:
                continue
            held = self.held(label)
            if held:
                skips.append(held)
                continue
            index.set_const(node.input[1], index.const(node.input[1]) * self.factors[label])
            changes.append(Change("scaled", (label,)))
        return PassResult(model, changes, skips)


def chain():
    c = Chain(channels=3, seed=0)
    for _ in range(4):
        c.conv(4).relu()
    model = c.build()
    return model, [GraphIndex(model.graph).labels[i] for i, n in enumerate(model.graph.node)
                   if n.op_type == "Conv"]


def manager(model, factors, strict=False):
    verifier = Verifier(model, verify.random_inputs(model), rtol=1e-6,
                        bounds=verify.output_bounds(model))
    return PassManager([Stage("scale", lambda m, s: ScaleWeights(factors))], verifier=verifier,
                       strict=strict)


@pytest.mark.parametrize("bad", [[1], [0, 3], [0, 1, 2, 3]])
def test_only_the_units_that_break_the_check_are_rolled_back(bad):
    model, convs = chain()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    factors = {label: (1.5 if k in bad else 1.0) for k, label in enumerate(convs)}
    run = manager(model, factors).run(work)
    (_, result), = run.results
    assert {c.nodes[0] for c in result.changes} == {convs[k] for k in range(4) if k not in bad}
    rolled = {s.node: s.reason for s in result.skips}
    assert set(rolled) == {convs[k] for k in bad}
    assert all(r.startswith("rolled back: pass 'scale' changed the model's outputs")
               for r in rolled.values())
    assert verify.compare(model, work, verify.random_inputs(model)).rel <= 1e-6


def test_strict_raises_instead():
    model, convs = chain()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    with pytest.raises(VerificationError, match="pass 'scale'"):
        manager(model, {convs[2]: 2.0}, strict=True).run(work)


def test_statistics_are_collected_once_per_model_state():
    model, _ = chain()
    calls = []

    def collect(m, data, tensors):
        calls.append(list(tensors))
        return type("S", (), {"tensors": dict.fromkeys(tensors), "skipped": {}})()

    cache = StatisticsCache(None, collect)
    out = model.graph.node[0].output[0]
    cache.get(model, [out])
    cache.get(model, [out])  # same state, same tensors: no new run
    assert len(calls) == 1
    cache.invalidate()
    cache.get(model, [out])
    assert len(calls) == 2


def test_statistics_rescaled_by_cle_equal_statistics_measured_after_it():
    from graphs import batch_for, mobileone_like
    from onnxrep.analysis.statistics import collect_statistics
    from onnxrep.passes.dead_inputs import ZeroDeadInputs
    from onnxrep.passes.equalize import EqualizeCrossLayer
    from onnxrep.pipeline import relu_inputs

    model = mobileone_like()
    x = batch_for(model, n=24)
    tensors = relu_inputs(model)
    before = collect_statistics(model, x, tensors)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    cle = EqualizeCrossLayer()
    result = cle(work)
    assert result.modified and cle.statistics_after(result)
    rescaled = before.rescaled(cle.statistics_after(result))
    measured = collect_statistics(work, x, tensors)
    for name in tensors:
        a, b = rescaled[name], measured[name]
        scale = np.abs(b.max).max()
        for field in ("mean", "min", "max"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5 * scale)
        np.testing.assert_allclose(a.var, b.var, rtol=1e-4, atol=1e-8 * scale ** 2)
    assert ZeroDeadInputs(before, None).statistics_after(result) == {}
