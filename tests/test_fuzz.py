"""Property test: random Conv chains through ``onnxrep.optimize`` in its three modes, checked
independently in onnxruntime.

Each example is a seed; the graph is built from a numpy generator on that seed (so a failure
prints the seed that rebuilds it: ``build(seed)``). Layers: Conv (groups, kernels, strides,
pads, auto_pad, dilations, with or without bias, outlier/dead/tiny channels, weights in
initializers or Constant nodes), Relu/LeakyRelu/PRelu, Max/AveragePool (ceil_mode too),
GlobalMaxPool, Pad (constant/reflect/edge), Clip, residual Add, Concat, BatchNormalization,
Mul/Add/Sub/Div by constants; heads GAP/Flatten/Reshape into Gemm/MatMul. Shapes come from
onnxruntime itself (a prefix of the graph is run), never from a formula.

Checked for every mode (plain; with calibration data of three batches; with
``OptimizeConfig(input_range=...)``): no exception other than ``onnxrep.errors`` types; the
input proto unchanged; a result that passes ``onnx.checker``; outputs within tolerance of the
original, on fresh inputs (plain, input range) or on every calibration batch (data mode).

The default run is bounded to about a minute (``FUZZ_EXAMPLES``, default 150). The slow variant
(``-m slow``) runs ``FUZZ_SLOW_EXAMPLES`` (default 2000) examples; ``FUZZ_REPORT=path`` writes
the counts as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import OptimizeConfig, errors

TOL = 1e-3  # relative to the largest reference output (the tool's own check is 1e-4)
COUNTS: collections.Counter = collections.Counter()


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.c = int(self.rng.choice([1, 2, 3, 4, 8]))
        self.hw = int(self.rng.choice([5, 7, 8, 12, 16]))
        self.nodes, self.inits, self.n = [], [], 0
        self.tensor = "input"
        self.shape = (2, self.c, self.hw, self.hw)
        self.saved = []  # (tensor, shape) for residual Adds

    def name(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value, prefix="c", as_node=False):
        value = np.asarray(value)
        name = self.name(prefix)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.name("Const"),
                                               value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def model(self, outputs, shape=None):
        graph = helper.make_graph(
            self.nodes, "fuzz",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                           ["N", self.c, self.hw, self.hw])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT,
                                           ["N", *shape[1:]] if shape else None)
             for o in outputs],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    def probe(self, tensor):
        """The tensor's shape as onnxruntime computes it (None when the graph is invalid)."""
        m = self.model([tensor])
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            sess = ort.InferenceSession(m.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
            x = np.zeros((2, self.c, self.hw, self.hw), np.float32)
            return sess.run(None, {"input": x})[0].shape
        except Exception:
            return None

    def add(self, op, inputs, n_out=1, **attrs):
        """Append a node on ``inputs``; keep it only when onnxruntime accepts it."""
        outs = [self.name("t") for _ in range(n_out)]
        mark = (len(self.nodes), len(self.inits))
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        shape = self.probe(outs[0])
        if shape is None or 0 in shape:
            del self.nodes[mark[0]:]
            del self.inits[mark[1]:]
            return False
        self.tensor, self.shape = outs[0], shape
        return True

    # ---- layers ---------------------------------------------------------------------------

    def conv(self, cout=None, src=None):
        r = self.rng
        src = src or self.tensor
        cin = self.shape[1]
        group = int(r.choice([g for g in (1, 2, 4, cin) if cin % g == 0]))
        if cout is None:
            cout = int(r.choice([2, 4, 8, 16]))
        if group > 1:
            cout = group * max(1, cout // group) if r.random() < 0.7 else group
        k = int(r.choice([1, 3, 5]))
        w = r.normal(0, float(r.choice([0.05, 0.5, 2.0])), (cout, cin // group, k, k))
        b = r.normal(0, 0.5, cout)
        kinds = r.random(cout)
        for o in range(cout):
            if kinds[o] < 0.1:
                w[o] *= float(r.choice([50, 300, 1000]))  # outlier
            elif kinds[o] < 0.2:
                w[o] = 0
                b[o] = -abs(b[o]) - 0.1  # dead after a ReLU
            elif kinds[o] < 0.25:
                w[o] *= 1e-6  # tiny
        as_node = r.random() < 0.2
        inputs = [src, self.const(w.astype(np.float32), "W", as_node)]
        if r.random() < 0.8:
            inputs.append(self.const(b.astype(np.float32), "B", as_node))
        attrs = dict(kernel_shape=[k, k], group=group)
        pad_mode = r.choice(["pads", "pads", "SAME_UPPER", "SAME_LOWER", "VALID"])
        if pad_mode == "pads":
            attrs["pads"] = [int(p) for p in r.integers(0, k // 2 + 1, 4)]
        else:
            attrs["auto_pad"] = str(pad_mode)
        if r.random() < 0.3:
            attrs["strides"] = [2, 2]
        if r.random() < 0.15 and k > 1:
            attrs["dilations"] = [2, 2]
        return self.add("Conv", inputs, **attrs)

    def activation(self):
        r = self.rng
        op = r.choice(["Relu", "Relu", "LeakyRelu", "PRelu", "Clip"])
        if op == "Relu":
            return self.add("Relu", [self.tensor])
        if op == "LeakyRelu":
            return self.add("LeakyRelu", [self.tensor], alpha=float(r.choice([0.01, 0.1])))
        if op == "PRelu":
            slope = r.uniform(0, 0.3, (self.shape[1], 1, 1)).astype(np.float32)
            return self.add("PRelu", [self.tensor, self.const(slope, "slope")])
        lo, hi = (0.0, 6.0) if r.random() < 0.6 else sorted(r.normal(0, 2, 2))
        return self.add("Clip", [self.tensor, self.const(np.float32(lo)),
                                 self.const(np.float32(hi))])

    def pool(self):
        r = self.rng
        op = r.choice(["MaxPool", "AveragePool", "GlobalMaxPool"])
        if op == "GlobalMaxPool":
            return self.add(op, [self.tensor])
        k = int(r.choice([2, 3]))
        attrs = dict(kernel_shape=[k, k], strides=[int(r.choice([1, 2]))] * 2,
                     pads=[int(p) for p in r.integers(0, k // 2 + 1, 4)],
                     ceil_mode=int(r.random() < 0.4))
        h, w = self.shape[2:]
        pads = attrs["pads"]
        if h + pads[0] + pads[2] < k or w + pads[1] + pads[3] < k:
            return False  # an empty output: onnxruntime 1.32 dies of SIGFPE on it
        if op == "AveragePool":
            attrs["count_include_pad"] = int(r.random() < 0.5)
        return self.add(op, [self.tensor], **attrs)

    def pad(self):
        r = self.rng
        mode = str(r.choice(["constant", "reflect", "edge"]))
        p = [0, 0] + [int(v) for v in r.integers(0, 2, 2)] + [0, 0] + [int(v) for v in
                                                                      r.integers(0, 2, 2)]
        inputs = [self.tensor, self.const(np.array(p, np.int64), "pads")]
        if mode == "constant" and r.random() < 0.5:
            inputs.append(self.const(np.float32(r.normal())))
        return self.add("Pad", inputs, mode=mode)

    def affine(self):
        r = self.rng
        op = str(r.choice(["Mul", "Add", "Sub", "Div"]))
        shape = () if r.random() < 0.4 else (self.shape[1], 1, 1)
        v = r.normal(0, 1, shape)
        if op in ("Mul", "Div"):
            v = np.sign(v + 1e-9) * (np.abs(v) + 0.2)
        return self.add(op, [self.tensor, self.const(v.astype(np.float32))])

    def bn(self):
        r = self.rng
        c = self.shape[1]
        params = [r.normal(1, 0.3, c), r.normal(0, 0.3, c), r.normal(0, 0.3, c),
                  r.uniform(0.01, 2, c)]
        if r.random() < 0.2:
            params[3][0] = 1e-6  # a near-dead channel's variance
        return self.add("BatchNormalization",
                        [self.tensor, *(self.const(p.astype(np.float32)) for p in params)],
                        epsilon=1e-5)

    def residual(self):
        start, shape = self.tensor, self.shape
        if not self.conv(cout=shape[1]):
            return False
        if self.shape != shape:
            return True  # the conv changed the shape: keep it, no Add
        return self.add("Add", [self.tensor, start])

    def concat(self):
        start = self.tensor
        if not self.conv():
            return False
        first, shape1 = self.tensor, self.shape
        self.tensor, self.shape = start, self.probe(start)
        if not self.conv() or self.shape[2:] != shape1[2:]:
            return bool(self.tensor)
        return self.add("Concat", [first, self.tensor], axis=1)

    def head(self):
        r = self.rng
        kind = r.choice(["gap", "flatten", "reshape"])
        if kind == "gap":
            self.add("GlobalAveragePool", [self.tensor])
        if kind == "reshape":
            ok = self.add("Reshape", [self.tensor, self.const(np.array([0, -1], np.int64))])
        else:
            ok = self.add("Flatten", [self.tensor], axis=1)
        if not ok:
            return
        for _ in range(int(r.integers(1, 3))):
            features = self.shape[1]
            nout = int(r.choice([3, 5, 10]))
            w = r.normal(0, 0.3, (features, nout)).astype(np.float32)
            if r.random() < 0.5:
                self.add("MatMul", [self.tensor, self.const(w, "W")])
            else:
                self.add("Gemm", [self.tensor, self.const(w.T.copy(), "W"),
                                  self.const(r.normal(0, 0.1, nout).astype(np.float32), "B")],
                         transB=1)
            if r.random() < 0.5:
                self.add("Relu", [self.tensor])


def build(seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    r = b.rng
    b.conv()
    for _ in range(int(r.integers(2, 9))):
        step = r.choice(["conv", "conv", "act", "act", "pool", "pad", "affine", "bn",
                         "residual", "concat"])
        {"conv": b.conv, "act": b.activation, "pool": b.pool, "pad": b.pad,
         "affine": b.affine, "bn": b.bn, "residual": b.residual, "concat": b.concat}[step]()
    if r.random() < 0.7:
        b.head()
    model = b.model([b.tensor], b.shape)
    onnx.checker.check_model(model)
    return model


# ---- the property -----------------------------------------------------------------------------

def _session(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _rel(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        return np.inf
    if not np.isfinite(out).all():
        return np.inf
    scale = float(np.abs(ref).max(initial=0.0))
    err = float(np.abs(ref - out).max(initial=0.0))
    return err / scale if scale > 0 else (0.0 if err == 0 else np.inf)


def _worst(original, result, batches):
    a, b = _session(original), _session(result)
    return max(_rel(a.run(None, f)[0], b.run(None, f)[0]) for f in batches)


def check_one(seed: int) -> None:
    model = build(seed)
    before = model.SerializeToString()
    rng = np.random.default_rng(seed + 1)
    c, hw = (model.graph.input[0].type.tensor_type.shape.dim[i].dim_value for i in (1, 2))
    calib = rng.standard_normal((24, c, hw, hw)).astype(np.float32)
    ref_ok = np.isfinite(_session(model).run(None, {"input": calib})[0]).all()
    modes = {
        "plain": (OptimizeConfig(), None,
                  [{"input": rng.standard_normal((3, c, hw, hw)).astype(np.float32)}
                   for _ in range(2)]),
        "calib": (OptimizeConfig(batch_size=8), calib,
                  [{"input": calib[i:i + 8]} for i in range(0, 24, 8)]),
        "range": (OptimizeConfig(input_range=(-1.0, 1.0)), None,
                  [{"input": rng.uniform(-1, 1, (3, c, hw, hw)).astype(np.float32)}
                   for _ in range(2)]),
    }
    for mode, (config, data, checks) in modes.items():
        COUNTS["runs"] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # numpy must not warn either
            try:
                result = onnxrep.optimize(model, config, calib=data)
            except errors.OnnxrepError as exc:
                COUNTS[f"{mode}: {type(exc).__name__}"] += 1
                if isinstance(exc, errors.VerificationError):
                    COUNTS["verification errors"] += 1
                assert model.SerializeToString() == before, f"seed {seed}: input mutated"
                continue
        assert model.SerializeToString() == before, f"seed {seed} {mode}: input mutated"
        onnx.checker.check_model(result)
        worst = _worst(model, result, checks)
        if ref_ok:
            assert worst <= TOL, f"seed {seed} {mode}: rel err {worst:.3e} without an error"
        COUNTS[f"{mode}: ok"] += 1
        COUNTS["changed" if result.SerializeToString() != before else "unchanged"] += 1


def _report():
    path = os.environ.get("FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(dict(COUNTS), f, indent=1, sort_keys=True)


SEEDS = st.integers(0, 2**31 - 1)


@settings(derandomize=True, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)),
          deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(seed=SEEDS)
def test_optimize_random_chains(seed):
    check_one(seed)
    COUNTS["examples"] += 1
    _report()


@pytest.mark.slow
@settings(derandomize=False, max_examples=int(os.environ.get("FUZZ_SLOW_EXAMPLES", 2000)),
          deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(seed=SEEDS)
def test_optimize_random_chains_long(seed):
    check_one(seed)
    COUNTS["examples"] += 1
    _report()


def test_builder_is_deterministic_and_valid():
    for seed in range(5):
        assert build(seed).SerializeToString() == build(seed).SerializeToString()
