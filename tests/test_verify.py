"""Output comparison: relative error against bounded activations' ranges."""

import numpy as np
import pytest

from graphs import Chain
from onnxrep import verify
from onnxrep.pipeline import OptimizeConfig, optimize_with_details


def saturated_detector(offset: float = -16.0):
    """Conv chain with outlier channels ending in a sigmoid map that random inputs leave at
    ~1e-7 everywhere, like a text detector's probability map on noise."""
    c = (Chain(channels=3, hw=(16, 16)).conv(8, outliers={2: 40.0}).relu()
         .conv(8, outliers={5: 30.0}).relu().conv(1, k=1, scale=0.002))
    return c.node("Add", [c.const(np.array(offset, np.float32))]).node("Sigmoid", []).build()


@pytest.mark.parametrize("op, bound", [("Sigmoid", 1.0), ("Tanh", 1.0), ("Softmax", 1.0),
                                       ("Relu", None)])
def test_output_bounds_name_bounded_activations(op, bound):
    model = Chain(channels=2).conv(4).node(op, []).build()
    out = model.graph.output[0].name
    assert verify.output_bounds(model).get(out) == bound


def test_bound_floors_the_relative_error_denominator_only():
    ref = np.array([1e-7, 2e-7])
    cand = ref + 1e-7
    assert verify.metrics(ref, cand).rel == pytest.approx(0.5)
    assert verify.metrics(ref, cand, bound=1.0).rel == pytest.approx(1e-7)
    big = np.array([10.0, -20.0])
    assert verify.metrics(big, big + 1, bound=1.0).rel == pytest.approx(1 / 20)


def test_optimize_verifies_a_saturated_sigmoid_map_against_its_range():
    model = saturated_detector()
    feeds = verify.random_inputs(model)
    result = optimize_with_details(model)
    assert result.comparison.rel <= 1e-6
    # what the plain max |reference| denominator would have reported: a false failure
    raw = verify.compare_outputs(verify.run(model, feeds), verify.run(result.model, feeds))
    assert raw.rel > OptimizeConfig().rtol
