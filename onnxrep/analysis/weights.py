"""Per-layer weight statistics: what per-tensor INT8 does to each weight layer.

Spread of a weight tensor = max |W| / median over output channels of max |W_c|: how far the
worst channel sticks out. INT8 SQNR = 10 log10(sum w^2 / sum (w - q(w))^2) for symmetric
per-tensor int8, q(w) = round(w / d) * d with d = max |W| / 127 (see ``int8_sqnr``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnxrep.ir.graph import GraphIndex, attr
from onnxrep.report import fmt

OUTLIER_MAX_ABS = 100.0
OUTLIER_SPREAD = 10.0
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SQNR_SAMPLES = 1 << 20
# weights per layer behind the per-channel figure: it is a mean over channels, and the
# equalization rule holds every layer of a chain's sample at once
CHANNEL_SQNR_SAMPLES = 1 << 16
SQNR_CAP = 200.0  # dB; an exactly representable channel counts as this, so sums stay finite


@dataclass(frozen=True)
class WeightStats:
    node: str
    op: str
    shape: tuple
    groups: int
    max_abs: float
    spread: float
    sqnr_db: float  # whole tensor: dominated by its largest channels
    channel_sqnr_db: float  # mean over output channels: what an outlier channel costs the rest

    @property
    def outlier(self) -> bool:
        return self.max_abs > OUTLIER_MAX_ABS or self.spread > OUTLIER_SPREAD

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["outlier"] = self.outlier
        return {k: _json_float(v) for k, v in d.items()}


def _json_float(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def channel_ranges(w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """max |w| per output channel of a Conv, ConvTranspose, Gemm or MatMul weight."""
    if node.op_type == "Conv":
        return _abs_max(w.reshape(w.shape[0], -1), axis=1)
    if node.op_type == "ConvTranspose":  # [Cin, Cout/g, k...]
        g = int(attr(node, "group", 1))
        return _abs_max(w.reshape(g, w.shape[0] // g, w.shape[1], -1), axis=(1, 3)).reshape(-1)
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return _abs_max(w, axis=1)
    return _abs_max(w.reshape(-1, w.shape[-1]), axis=0)


def _abs_max(a: np.ndarray, axis) -> np.ndarray:
    """max |a| along ``axis`` from the max and the min: no |a| copy of a large weight."""
    return np.maximum(a.max(axis=axis), -a.min(axis=axis))


def spread(ranges: np.ndarray) -> float:
    med = float(np.median(ranges)) if ranges.size else 0.0
    top = float(ranges.max(initial=0.0))
    if top == 0:
        return 1.0
    return top / med if med > 0 else math.inf


def int8_sqnr(w: np.ndarray, max_samples: int = SQNR_SAMPLES) -> float:
    """SQNR (dB) of symmetric per-tensor int8 quantization of ``w``.

    The step comes from the whole tensor; signal and noise are summed over an evenly strided
    sample of at most ``max_samples`` elements (exact for smaller tensors), which keeps
    statistics of a 50M-parameter model well under a second."""
    w = np.asarray(w, np.float32).ravel()
    top = float(_abs_max(w, axis=0)) if w.size else 0.0
    if top == 0:
        return math.inf
    if w.size > max_samples:
        w = w[:: -(-w.size // max_samples)]
    if not 1e-15 < top < 1e15:  # squares would overflow (or underflow) float32: SQNR is
        w, top = (w / np.float32(top)).astype(np.float32), 1.0  # scale-free, so normalize
    step = np.float32(top / 127.0)
    err = w / step
    np.round(err, out=err)  # |w| <= top, so no clipping is needed
    err *= step
    np.subtract(w, err, out=err)
    noise = float(np.dot(err, err))
    return math.inf if noise == 0 else 10 * math.log10(float(np.dot(w, w)) / noise)


def channel_sqnr(values: np.ndarray, channel: np.ndarray, channels: int, top: float) -> float:
    """Mean over output channels of each channel's SQNR (dB) under symmetric per-tensor INT8
    with step ``top / 127``: ``values`` (float64) with their output ``channel``. Each channel
    counts once, as in Nagel et al.'s sum of per-channel precisions r_c / max r; channels
    without signal are left out, and each channel's figure is held within +-SQNR_CAP."""
    if top == 0 or not values.size:
        return SQNR_CAP
    step = top / 127.0
    noise = np.bincount(channel, (values - np.round(values / step) * step) ** 2, channels)
    signal = np.bincount(channel, values * values, channels)
    live = signal > 0
    with np.errstate(divide="ignore"):
        db = 10 * np.log10(signal[live] / noise[live])
    return float(np.clip(db, -SQNR_CAP, SQNR_CAP).mean()) if live.any() else SQNR_CAP


def strided_sample(w: np.ndarray, node: onnx.NodeProto, max_samples: int = SQNR_SAMPLES
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(values in float64, their output channel) of an evenly strided sample of at most
    ``max_samples`` elements of a Conv, ConvTranspose, Gemm or MatMul weight."""
    at = sample_positions(w.size, max_samples)
    values = w.reshape(-1)[at].astype(np.float64)
    if node.op_type == "Conv":
        return values, at // (w.size // w.shape[0])
    if node.op_type == "ConvTranspose":  # [Cin, Cout/g, k...]: output o = g * Cout/g + j
        g = int(attr(node, "group", 1))
        taps = w.size // (w.shape[0] * w.shape[1])
        cin = at // (w.shape[1] * taps)
        return values, (cin // (w.shape[0] // g)) * w.shape[1] + (at // taps) % w.shape[1]
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return values, at // w.shape[1]
    return values, at % w.shape[-1]


def sample_positions(size: int, max_samples: int = SQNR_SAMPLES) -> np.ndarray:
    return np.arange(0, size, -(-size // max_samples) if size else 1, dtype=np.int64)


def weight_layers(model: onnx.ModelProto, index: GraphIndex | None = None):
    """Yield ``(node index, node, weight array)`` for layers with a constant float weight."""
    index = index or GraphIndex(model.graph)
    for i, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        w = index.const(node.input[1])
        if w is None or w.ndim < 2 or not np.issubdtype(w.dtype, np.floating):
            continue
        yield i, node, w


def weight_stats(model: onnx.ModelProto) -> list[WeightStats]:
    index = GraphIndex(model.graph)
    stats = []
    for i, node, w in weight_layers(model, index):
        ranges = channel_ranges(w, node)
        top = float(ranges.max(initial=0.0))
        values, channel = strided_sample(w, node, CHANNEL_SQNR_SAMPLES)
        stats.append(WeightStats(index.labels[i], node.op_type, tuple(w.shape),
                                 int(attr(node, "group", 1)), top, spread(ranges), int8_sqnr(w),
                                 channel_sqnr(values, channel, ranges.size, top)))
    return stats


def plot_ranges(models: list[tuple[str, onnx.ModelProto]], path: str, max_layers: int = 12) -> None:
    """Per-output-channel max |w| of the layers with the largest spread, one column per model.

    With two models (e.g. before and after CLE) the same layers are shown side by side, picked
    by the first model's spread and matched by node name.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_model = []
    for _, model in models:
        index = GraphIndex(model.graph)
        per_model.append({index.labels[i]: (node.op_type, channel_ranges(w, node))
                          for i, node, w in weight_layers(model, index)})
    first = per_model[0]
    names = sorted(first, key=lambda n: -spread(first[n][1]))[:max_layers]
    names = sorted(names, key=list(first).index)
    if not names:
        raise ValueError("the model has no Conv/Gemm/MatMul layers with constant weights")
    fig, axes = plt.subplots(len(names), len(models), squeeze=False,
                             figsize=(5.5 * len(models), 1.9 * len(names)))
    for col, ((title, _), layers) in enumerate(zip(models, per_model)):
        for row, name in enumerate(names):
            ax = axes[row][col]
            if name not in layers:
                ax.set_axis_off()
                continue
            op, r = layers[name]
            ax.bar(np.arange(r.size), r, width=1.0, color="tab:red" if spread(r) > OUTLIER_SPREAD
                   else "tab:blue")
            ax.set_title(f"{title}: {name} ({op}) max {fmt(float(r.max()))}, "
                         f"spread {fmt(spread(r))}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_xlim(-0.5, r.size - 0.5)
        axes[-1][col].set_xlabel("output channel", fontsize=8)
    fig.supylabel("max |w| per output channel", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
