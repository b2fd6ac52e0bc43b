"""Block reconstruction (BRECQ): the blocks found, export, the torch simulation of a block
against onnxruntime, determinism, the guards and the CLI flag."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")
import torch  # noqa: E402

from graphs import Chain, batch_for  # noqa: E402
from onnxrep import verify  # noqa: E402
from onnxrep.cli import main  # noqa: E402
from onnxrep.ptq.quantizer import QuantizeConfig, quantize_with_details  # noqa: E402
from onnxrep.training import adaround, brecq  # noqa: E402
from onnxrep.training.adaround import AdaRoundConfig  # noqa: E402
from onnxrep.training.brecq import learn_rounding  # noqa: E402

FAST = AdaRoundConfig(iterations=600)


def _hardswish_pair(seed: int = 0, tail: bool = False) -> onnx.ModelProto:
    """conv -> HardSwish -> depthwise conv with an outlier channel (a MobileOne/LCNet unit),
    with ``tail`` -> HardSwish -> 1x1 conv."""
    c = Chain(channels=3, hw=(12, 12), seed=seed).conv(8, name="conv_a").node("HardSwish", [])
    c.conv(8, group=8, name="conv_b", outliers={3: 8.0})
    if tail:
        c.node("HardSwish", []).conv(6, k=1, name="conv_c")
    return c.build()


def _se(seed: int = 0) -> onnx.ModelProto:
    """trunk conv -> GAP -> 1x1 conv -> Relu -> 1x1 conv -> HardSigmoid -> Mul(trunk) -> conv."""
    c = Chain(channels=3, hw=(8, 8), seed=seed).conv(8, name="trunk").relu()
    trunk, hw = c.tensor, c.hw
    c.gap().conv(4, k=1, pad=0, name="squeeze").relu().conv(8, k=1, pad=0, name="excite")
    c.node("HardSigmoid", [], alpha=1 / 6, beta=0.5).node("Mul", [trunk])
    c.hw = hw
    return c.conv(6, k=1, name="out").build()


def _quantized(model, per_channel: bool = False, n: int = 64):
    x = batch_for(model, n, seed=1)
    q = quantize_with_details(model, x, QuantizeConfig(per_channel=per_channel))
    return q, [{"input": x[i:i + 16]} for i in range(0, n, 16)]


def _blocks(q) -> dict[str, str]:
    layers = adaround._find_layers(q.float_model, q.model, [])
    found = brecq.find_blocks(q.float_model, q.model, layers)
    return {layers[b.first].node: layers[b.second].node for b in found.values()}


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_blocks_found_a_layer_its_activation_and_the_next_layer():
    q, _ = _quantized(_hardswish_pair(tail=True))
    # greedy in topological order: conv_a + conv_b; conv_c has no next layer
    assert _blocks(q) == {"conv_a": "conv_b"}
    q, _ = _quantized(_se())
    # the trunk conv's output also feeds the Mul (two layers reached) and the excite conv's
    # HardSigmoid meets the trunk: only the squeeze/excite pair on pooled features is a block
    assert _blocks(q) == {"squeeze": "excite"}


def _weight_dqs(qdq):
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: dq_of[n.input[1]] for n in qdq.graph.node
            if n.op_type in adaround.LAYER_OPS and n.input[1] in dq_of}


def _values(model: onnx.ModelProto, names: list[str], feeds: dict) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return verify.session(m).run(names, feeds)


@pytest.mark.parametrize("per_channel, seed", [(False, 3), (True, 4)])
def test_block_codes_export_bit_exact_and_deterministic(per_channel, seed):
    # seeds where both guards keep the learned codes (on so small a block the gain is a few
    # percent of its output MSE, and the held-out check rejects it for other seeds)
    q, batches = _quantized(_hardswish_pair(seed=seed), per_channel)
    out, record = learn_rounding(q.float_model, q.model, batches, FAST)
    again, _ = learn_rounding(q.float_model, q.model, batches, FAST)
    assert record.mode == "block" and record.kept
    rows = {r.node: r for r in record.layers}
    assert rows["conv_a"].method == rows["conv_b"].method == "block"
    assert rows["conv_a"].block == "conv_b" and rows["conv_b"].block == "conv_a"
    assert rows["conv_a"].loss_learned < rows["conv_a"].loss_nearest
    assert rows["conv_a"].held_learned < rows["conv_a"].held_nearest
    dqs = _weight_dqs(out)
    floats = {n.name: _init(q.float_model, n.input[1]) for n in q.float_model.graph.node
              if n.op_type == "Conv"}
    changed = 0
    for name in ("conv_a", "conv_b"):
        dq = dqs[name]
        codes, scale = _init(out, dq.input[0]), _init(out, dq.input[1])
        assert np.array_equal(codes, _init(again, dq.input[0]))  # seeded: same codes
        nearest = _init(q.model, dq.input[0])
        changed += int(np.sum(codes != nearest))
        assert int(np.sum(codes != nearest)) == rows[name].changed
        s = adaround._broadcast(scale, codes.shape, 0).astype(np.float32)
        step = codes.astype(np.int64) - np.floor(floats[name] / s).astype(np.int64)
        assert set(np.unique(step)) <= {0, 1}  # every code rounds w / s down or up
        (deq,) = _values(out, [dq.output[0]], {"input": batches[0]["input"]})
        fake = ((torch.from_numpy(codes.astype(np.float32)) - 0.0)
                * torch.from_numpy(np.ascontiguousarray(s))).numpy()
        assert np.array_equal(deq.view(np.int32), fake.view(np.int32))
    assert changed > 0
    learned = {dqs[r.node].input[0] for r in record.layers}
    for t in q.model.graph.initializer:  # scales, zero points, int32 biases unchanged
        if t.name not in learned:
            assert np.array_equal(numpy_helper.to_array(t), _init(out, t.name)), t.name


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - x) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(np.sum(ref.astype(np.float64) ** 2) / noise)


@pytest.mark.parametrize("model", [_hardswish_pair, _se])
def test_torch_simulation_of_the_block_matches_onnxruntime(model):
    """The block's QDQ path in torch (activation Q/DQ as onnxruntime computes them, the learned
    weights) reproduces onnxruntime's output of the block's second layer."""
    q, batches = _quantized(model(seed=2))
    out, record = learn_rounding(q.float_model, q.model, batches, FAST)
    layers = adaround._find_layers(q.float_model, out, [])
    (block,) = brecq.find_blocks(q.float_model, out, layers).values()
    first, second = layers[block.first], layers[block.second]
    nodes = {n.name: n for n in out.graph.node}
    x_in, y_out = nodes[first.node].input[0], nodes[second.node].output[0]
    feeds = {"input": batch_for(q.float_model, 16, seed=9)}
    weights = {}
    for lay in (first, second):
        r = adaround._Rounder(lay)
        codes = torch.from_numpy(adaround._torch_layout(
            lay, _init(out, lay.codes_name).astype(np.float32)).copy())
        weights[lay.qdq_index] = (r.dequant(codes), torch.from_numpy(lay.qbias))
    x, y = _values(out, [x_in, y_out], feeds)  # onnxruntime's QuantizeLinear/DequantizeLinear
    with torch.no_grad():
        sim, _ = block.qdq.run(torch.from_numpy(x), weights)
    # measured: 143 dB / 147 dB (float summation order only: every activation code agrees)
    assert _sqnr(y, sim.numpy()) > 60, _sqnr(y, sim.numpy())


def test_block_guard_falls_back_to_layers_and_model_guard_to_nearest(monkeypatch):
    q, batches = _quantized(_hardswish_pair(seed=3))
    real = brecq.learn_block

    def worse(*args):  # learned, but claims a higher held-out error than layer-wise
        r = real(*args)
        return brecq.BlockResult(r.codes, r.fit, (*r.held[:2], r.held[1] * 2), r.iterations)

    monkeypatch.setattr(brecq, "learn_block", worse)
    _, record = learn_rounding(q.float_model, q.model, batches, FAST)
    assert {r.method for r in record.layers} == {"moments"}  # the layer-wise codes written

    def far(block, layers, *args):  # claims lower errors, returns codes far off
        r = real(block, layers, *args)
        off = tuple(torch.clamp(c + 9, -128, 127) for c in r.codes)
        return brecq.BlockResult(off, (1.0, 0.9, 0.5), (1.0, 0.9, 0.5), r.iterations)

    monkeypatch.setattr(brecq, "learn_block", far)
    out, record = learn_rounding(q.float_model, q.model, batches, FAST)
    assert not record.kept and out is q.model
    assert record.sqnr_learned < record.sqnr_nearest and "discarded" in record.summary()


def test_block_budget_bounds_the_iterations(monkeypatch):
    """A block learns for min(iterations, max(min_iterations, budget / (3 x its multiply-adds
    per step))) iterations; without a budget for all."""
    q, batches = _quantized(_hardswish_pair(seed=4))
    real, seen = brecq.learn_block, []
    monkeypatch.setattr(brecq, "learn_block", lambda *a: seen.append(real(*a)) or seen[-1])
    cfg = AdaRoundConfig(iterations=300, block_budget=1e8, min_iterations=20)
    learn_rounding(q.float_model, q.model, batches, cfg)
    # one step: 4 samples x 144 positions x (8 x 27 + 8 x 9) multiply-adds, times 3: 200
    assert [r.iterations for r in seen] == [int(1e8 // (3 * 4 * 144 * (8 * 27 + 8 * 9)))]
    seen.clear()
    learn_rounding(q.float_model, q.model, batches, replace(cfg, block_budget=1e6))
    assert [r.iterations for r in seen] == [20]  # at least min_iterations
    seen.clear()
    learn_rounding(q.float_model, q.model, batches,
                   AdaRoundConfig(iterations=40, block_budget=None))
    assert [r.iterations for r in seen] == [40]


def test_cli_rounding_block(tmp_path, capsys):
    model = _hardswish_pair(seed=5)
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, input=batch_for(model, 64, seed=1))
    assert main(["quantize", str(src), "--calib", str(calib), "--rounding", "block",
                 "--rounding-samples", "32", "-o", str(tmp_path / "q.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rounding = doc["rounding"]
    assert rounding["mode"] == "block"
    assert {r["method"] for r in rounding["layers"]} >= {"block"}
    q = quantize_with_details(model, batch_for(model, 64, seed=1),
                              QuantizeConfig(rounding="block"))
    assert q.rounding.mode == "block" and "learned rounding" in q.stages
