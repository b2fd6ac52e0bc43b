"""Merge the parallel branches of a re-parameterizable block (train form) into one Conv.

A block is a tree of binary ``Add`` (and ``Sum``) nodes whose leaves all read one tensor x,
optionally followed by per-channel affine ops:

    y = A_post( sum_b B_b(x) + k )

Every branch B_b is affine in x and a convolution of x, ``B_b(x) = W_b * x + b_b``:

    Conv [-> BN, Mul/Div/Sub by k]        W_b = t (.) W,  b_b = t (.) b + c         (fold below)
    BatchNormalization(x), x, x * k       W_b = t (.) I_g  (identity kernel within its group:
                                          I[o, o mod C/g, centre] = 1), b_b = c
    AveragePool k (count_include_pad=1,   W_b = I_g / prod(k) on every tap, b_b = 0
      or no pads)
    Conv 1x1 (stride 1) -> [affine] ->    W[o, c] = sum_m W2[o, m] T[m] W1[m, c]
      [Pad] -> Conv kxk or AveragePool    b[o] = b2[o] + sum_{m, taps} W2[o, m, taps] c1[m]
                                          (c1 = T b1 + C: the 1x1 output where x = 0)

with an affine op ``z = t (.) y + c`` (per output channel, or a scalar broadcast):
BatchNormalization t = gamma / sqrt(var + eps), c = beta - mean t; ``y * k`` t = k;
``y / k`` t = 1/k; ``y - k`` c = -k; ``k - y`` t = -1, c = k; ``y + k`` c = k. A constant leaf
k of the sum (scalar or per channel) adds to the bias. Convolution is linear in its kernel,
so with each branch kernel zero-padded into one K placed at tap offset (P - p_b) / d per
spatial axis (P = the largest begin pad), the block is ``W = sum_b W_b``, ``b = sum_b b_b + k``;
a BatchNormalization or Mul/Add/Sub/Div by a per-channel or scalar constant after the sum
(QARepVGG, RepViT's RepDW, PP-LCNetV3's learnable affine) folds in: W' = t W, b' = t b + c.
Everything is computed in float64 and written once in the dtype of the block's Conv weights.

This is exact when, per spatial axis, every branch has the same stride, the same dilation
(branches with kernel 1 on the axis adopt any), the same output extent
``p_begin + p_end - (k - 1) d`` (so the same output size for every input size) and a begin-pad
difference divisible by d; Conv branches share groups and output channels (identity and
average-pool branches are per channel, so they fit any groups when out channels == in
channels). A 1x1 -> kxk sequence is exact only where the padding rings of the intermediate
hold the value the merged conv implies, c1: a ring made by the 1x1's own pads always does, a
Pad ring must have the value c1 (DBB pads with its BN's shift for this reason), and zero
padding of the kxk needs c1 = 0 (a 1x1 without bias or BN shift); anything else is refused.
A block is left alone, with the reason (``Skip(root Add, reason)``), when these do not hold,
when a branch's output is read elsewhere or is a graph output, when a leaf does not read the
shared input, or when a weight or BN parameter is not a constant (initializers, Constant
nodes and Identity copies of them are). Initializers are never modified: merged weights are
new initializers; constants left unread are removed with the nodes merged away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxrep.ir.graph import GraphIndex, attr, is_onnx, remove_unused_constants, unique_name
from onnxrep.passes.base import Change, Contract, Pass, PassResult, Skip

SUM_OPS = ("Add", "Sum")
BRANCH_AFFINE = ("BatchNormalization", "Mul", "Div", "Sub")  # on a branch, before the sum
POST_AFFINE = BRANCH_AFFINE + ("Add",)  # after the sum
RTOL_PAD = 1e-6  # a Pad value equals the 1x1 output it stands for to this relative tolerance


class _Refuse(Exception):
    """Why a block cannot be merged."""


# ---- the pass ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergedBlock:
    """One block merged into one Conv: ``branches`` as text (``"3x3 + 1x1 + identity"``),
    ``after``: what was folded after the sum (``["BatchNormalization"]``)."""

    block: str
    conv: str
    input: str
    branches: str
    after: list
    kernel: str
    groups: int
    strides: list
    convs_before: int
    convs_after: int
    bns_folded: int
    detail: str


@dataclass(frozen=True)
class ReparamSummary:
    blocks: list  # MergedBlock per merged block
    skipped: int
    convs_before: int
    convs_after: int
    bns_before: int
    bns_after: int
    unused_removed: int

    @property
    def merged(self) -> int:
        return len(self.blocks)


class Reparameterize(Pass):
    name = "reparameterize"
    contract = Contract.EQUIVALENT

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        convs_before = _count(graph, "Conv")
        bns_before = _count(graph, "BatchNormalization")
        changes: list[Change] = []
        blocks_info: list[MergedBlock] = []
        skips: list[Skip] = []
        for _ in range(len(graph.node) + 1):  # sweeps; one is enough for every known family
            index = _index(model)
            blocks = _find(index)
            skips = [Skip(b.root, b.reason) for b in blocks if b.reason is not None]
            skips += [self.held(b.root) for b in blocks if b.reason is None and self.held(b.root)]
            plans = [b for b in blocks if b.reason is None and not self.held(b.root)]
            if not plans:
                break
            taken = set(index.producer) | set(index.initializers) | index.graph_inputs
            removed = set().union(*(b.nodes for b in plans))
            names = {n.name for i, n in enumerate(graph.node) if n.name and i not in removed}
            replace: dict[int, onnx.NodeProto] = {}
            for block in plans:
                conv, info = _merge(index, block, taken, names)
                replace[block.last] = conv
                blocks_info.append(info)
                changes.append(Change("merged", (block.root, conv.name), info.detail))
            nodes = []
            for i, node in enumerate(graph.node):
                if i in replace:
                    nodes.append(replace[i])
                elif i not in removed:
                    nodes.append(node)
            del graph.node[:]
            graph.node.extend(nodes)
        removed_consts = remove_unused_constants(graph) if changes else 0
        summary = ReparamSummary(blocks_info, len(skips), convs_before, _count(graph, "Conv"),
                                 bns_before, _count(graph, "BatchNormalization"),
                                 removed_consts)
        return PassResult(model, changes, skips, summary)


def reparameterize(model: onnx.ModelProto, *, rtol: float | None = None,
                   input_shapes: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with every re-parameterizable block merged into one Conv; ``model``
    is untouched. With ``rtol`` the copy is compared with ``model`` in onnxruntime on seeded
    random inputs (``input_shapes`` for symbolic dims) and :class:`VerificationError` raised
    past it."""
    from onnxrep import verify
    from onnxrep.passes.base import PassManager, Stage, Verifier

    work = onnx.ModelProto()
    work.CopyFrom(model)
    verifier = None if rtol is None else Verifier(
        model, verify.random_inputs(model, input_shapes), rtol=rtol,
        bounds=verify.output_bounds(model))
    PassManager([Stage("reparameterize", lambda m, s: Reparameterize())],
                verifier=verifier).run(work)
    return work


@dataclass(frozen=True)
class RepBlock:
    """A multi-branch block found by :func:`find_blocks`: the root Add/Sum, the shared input,
    the branches (``"3x3"``, ``"1x1"``, ``"1x1>3x3"``, ``"avg3x3"``, ``"BN"``, ``"x"``), and
    ``reason`` None when it merges."""

    root: str
    input: str
    branches: tuple[str, ...]
    reason: str | None


def find_blocks(model: onnx.ModelProto) -> list[RepBlock]:
    """The re-parameterizable blocks of ``model`` (mergeable or not, with the reason), without
    computing any merged weight: cheap enough to decide whether to run :class:`Reparameterize`
    (``any(b.reason is None for b in find_blocks(model))``)."""
    return [RepBlock(b.root, b.x, tuple(br.label for br in b.branches), b.reason)
            for b in _find(_index(model))]


# ---- constants and affine ops -----------------------------------------------------------------

def _through_identity(index: GraphIndex, name: str) -> str:
    """The tensor ``name`` copies through Identity nodes (torch exports share initializers so)."""
    for _ in range(len(index.graph.node)):
        i = index.producer.get(name)
        if i is None:
            break
        node = index.node(i)
        if node.op_type != "Identity" or not is_onnx(node) or len(node.input) != 1:
            break
        name = node.input[0]
    return name


def _const(index: GraphIndex, name: str) -> np.ndarray | None:
    return index.const(_through_identity(index, name)) if name else None


def _is_const(index: GraphIndex, name: str) -> bool:
    return bool(name) and index.is_const(_through_identity(index, name))


SMALL_SUBGRAPH = 64  # nodes: torch builds a Pad's pads from constants with a dozen ops


def _computed_const(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of a tensor computed from constants alone by at most SMALL_SUBGRAPH nodes
    (torch's export of F.pad builds the pads with ConstantOfShape, Concat, Reshape, Slice,
    Transpose and Cast), evaluated with onnx's reference runtime; None otherwise."""
    if _is_const(index, name):
        return _const(index, name)
    needed, stack = set(), [name]
    while stack:
        t = stack.pop()
        if not t or _is_const(index, t):
            continue
        i = index.producer.get(t)
        if i is None or not is_onnx(index.node(i)) or len(needed) >= SMALL_SUBGRAPH:
            return None
        if i not in needed:
            needed.add(i)
            stack.extend(index.node(i).input)
    nodes = [index.node(i) for i in sorted(needed)]
    inputs = {n for node in nodes for n in node.input if n and _is_const(index, n)}
    inits = [numpy_helper.from_array(_const(index, n), n) for n in sorted(inputs)]
    result = helper.make_value_info(name, onnx.TypeProto())
    graph = helper.make_graph(nodes, "constant", [], [result], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _opset(index))])
    try:
        from onnx.reference import ReferenceEvaluator

        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # an op the reference runtime lacks: treat the value as unknown
        return None


def _opset(index: GraphIndex) -> int:
    return getattr(index, "opset", None) or onnx.defs.onnx_opset_version()


def _index(model: onnx.ModelProto) -> GraphIndex:
    """A GraphIndex that also knows the model's default-domain opset."""
    index = GraphIndex(model.graph)
    index.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                       None)
    return index


def _label(index: GraphIndex, i: int) -> str:
    return f"{index.node(i).op_type} '{index.labels[i]}'"


@dataclass(frozen=True)
class _Affine:
    """``z = t * y + c`` with t, c float64 scalars ([1]) or per channel ([n], or a constant
    kept in its broadcast shape until the channel count is known)."""

    node: int
    kind: str
    t: np.ndarray
    c: np.ndarray
    bn: bool = False

    def vectors(self, n: int, rank: int, where: str) -> tuple[np.ndarray, np.ndarray]:
        if self.bn:
            if self.t.size != n:
                raise _Refuse(f"{where} has {self.t.size} channels where the branch has {n}")
            return self.t, self.c
        return _per_channel(self.t, n, rank, where), _per_channel(self.c, n, rank, where)


def _per_channel(k: np.ndarray, n: int, rank: int, where: str) -> np.ndarray:
    """A constant that broadcasts against [N, n, ...] (rank ``rank``) as a length-n vector."""
    if k.ndim > rank:
        raise _Refuse(f"the constant of {where} has rank {k.ndim} > {rank}")
    shape = (1,) * (rank - k.ndim) + k.shape
    if any(s != 1 for axis, s in enumerate(shape) if axis != 1) or shape[1] not in (1, n):
        raise _Refuse(f"the constant of {where} (shape {list(k.shape)}) is not a scalar or "
                      f"per channel of {n}")
    return np.broadcast_to(k.reshape(-1), (n,)).astype(np.float64)


def _affine(index: GraphIndex, i: int, ops: tuple[str, ...]) -> tuple[_Affine, str] | None:
    """(affine map, data input) of node ``i`` when it is a per-channel affine op of one
    computed tensor and constants, else None."""
    node = index.node(i)
    if node.op_type not in ops or not is_onnx(node):
        return None
    if node.op_type == "BatchNormalization":
        if attr(node, "training_mode", 0) or any(o for o in node.output[1:]):
            return None
        if len(node.input) < 5 or not all(_is_const(index, n) for n in node.input[1:5]):
            return None
        if _is_const(index, node.input[0]):
            return None
        gamma, beta, mean, var = (_const(index, n).astype(np.float64).reshape(-1)
                                  for n in node.input[1:5])
        if not gamma.size == beta.size == mean.size == var.size:
            return None
        t = gamma / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
        return _Affine(i, "BN", t, beta - mean * t, bn=True), node.input[0]
    if len(node.input) != 2 or _is_const(index, node.input[0]) == _is_const(index, node.input[1]):
        return None
    first = not _is_const(index, node.input[0])
    data, k = (node.input[0], node.input[1]) if first else (node.input[1], node.input[0])
    k = _const(index, k)
    if not np.issubdtype(k.dtype, np.floating):
        return None
    k = k.astype(np.float64)
    if node.op_type == "Mul":
        return _Affine(i, "Mul", k, np.zeros_like(k)), data
    if node.op_type == "Add":
        return _Affine(i, "Add", np.ones_like(k), k), data
    if node.op_type == "Sub":
        return (_Affine(i, "Sub", np.ones_like(k), -k) if first
                else _Affine(i, "Sub", -np.ones_like(k), k)), data
    if first and np.all(k != 0):  # Div
        return _Affine(i, "Div", 1.0 / k, np.zeros_like(k)), data
    return None


def _apply(affines: list[_Affine], n: int, rank: int, index: GraphIndex
           ) -> tuple[np.ndarray, np.ndarray]:
    """(T, C) of the composition of ``affines`` (given innermost first) on n channels."""
    T, C = np.ones(n), np.zeros(n)
    for a in affines:
        t, c = a.vectors(n, rank, _label(index, a.node))
        T, C = t * T, t * C + c
    return T, C


# ---- geometry ---------------------------------------------------------------------------------

@dataclass
class _Geometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]
    ends: tuple[int, ...]

    def extent(self, axis: int) -> int:
        """p_begin + p_end - (k - 1) d: the output size is floor((H + extent - 1) / s) + 1."""
        return (self.begins[axis] + self.ends[axis]
                - (self.kernel[axis] - 1) * self.dilations[axis])


def _geometry(node: onnx.NodeProto, kernel: tuple[int, ...], where: str) -> _Geometry:
    r = len(kernel)
    strides = tuple(attr(node, "strides", [1] * r))
    dilations = tuple(attr(node, "dilations", [1] * r))
    pads = list(attr(node, "pads", [0] * 2 * r))
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if len(strides) != r or len(dilations) != r or len(pads) != 2 * r:
        raise _Refuse(f"{where} has strides, dilations or pads of the wrong length")
    if auto == "VALID":
        pads = [0] * 2 * r
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            raise _Refuse(f"{where} has auto_pad {auto} with stride > 1 (its pads depend on the "
                          "input size)")
        total = [(k - 1) * d for k, d in zip(kernel, dilations)]
        small = [t // 2 for t in total]
        big = [t - s for t, s in zip(total, small)]
        pads = small + big if auto == "SAME_UPPER" else big + small
    elif auto != "NOTSET":
        raise _Refuse(f"{where} has auto_pad {auto}")
    if any(p < 0 for p in pads):
        raise _Refuse(f"{where} has negative pads")
    return _Geometry(tuple(kernel), strides, dilations, tuple(pads[:r]), tuple(pads[r:]))


def _kernel_text(kernel) -> str:
    return "x".join(str(k) for k in kernel)


# ---- branches ---------------------------------------------------------------------------------

@dataclass
class _Branch:
    """One leaf of the sum as a convolution of the shared input."""

    label: str
    kind: str  # "conv", "seq", "avg", "identity"
    nodes: list[int]  # merged away with the block
    tensors: list[str]  # computed tensors that must have one reader and not be graph outputs
    affines: list[_Affine]  # on the branch output, innermost first
    geometry: _Geometry | None = None  # None: identity (1x1, stride 1, no pads)
    node: int | None = None  # the (last) Conv or AveragePool
    first: int | None = None  # the 1x1 Conv of a sequence
    mid: list = field(default_factory=list)  # sequence stages between the two, forward order
    convs: int = 0
    bns: int = 0

    @property
    def diagonal(self) -> bool:
        return self.kind in ("identity", "avg")


def _interpretations(index: GraphIndex, leaf: str) -> list[tuple[str, object]]:
    """Every tensor ``leaf`` is a branch of: (tensor, _Branch or the reason it cannot merge),
    nearest first. Follows producers regardless of readers (checked once x is chosen)."""
    found: list[tuple[str, object]] = []
    nodes: list[int] = []
    tensors: list[str] = []
    affines: list[_Affine] = []  # outermost first while walking back
    t = leaf
    for _ in range(len(index.graph.node) + 1):
        inner = list(reversed(affines))
        bns = sum(a.bn for a in affines)
        label = "BN" if bns else ("x" if not affines else "x*k")
        found.append((t, _Branch(label, "identity", list(nodes), list(tensors), inner, bns=bns)))
        i = index.producer.get(t)
        if i is None:
            break
        node = index.node(i)
        if not is_onnx(node):
            break
        step = _affine(index, i, BRANCH_AFFINE)
        if step is not None:
            tensors.append(t)
            nodes.append(i)
            affines.append(step[0])
            t = step[1]
            continue
        if node.op_type in ("Conv", "AveragePool") and node.input:
            tensors.append(t)
            nodes.append(i)
            found.extend(_base_branches(index, i, nodes, tensors, list(reversed(affines))))
        break
    return found


def _base_branches(index: GraphIndex, i: int, nodes: list[int], tensors: list[str],
                   affines: list[_Affine]) -> list[tuple[str, object]]:
    """The Conv / AveragePool ``i`` (with ``affines`` after it) as a branch of its input, and
    as a 1x1 -> kxk sequence of the 1x1 Conv's input when one feeds it."""
    node = index.node(i)
    where = _label(index, i)
    bns = sum(a.bn for a in affines)
    out: list[tuple[str, object]] = []
    try:
        geometry, convs = _op_geometry(index, i), int(node.op_type == "Conv")
        kind = "conv" if convs else "avg"
        label = (_kernel_text(geometry.kernel) if convs else f"avg{_kernel_text(geometry.kernel)}")
        out.append((node.input[0], _Branch(label, kind, list(nodes), list(tensors), affines,
                                           geometry, i, convs=convs, bns=bns)))
    except _Refuse as why:
        out.append((node.input[0], str(why)))
        return out
    # a sequence: input <- [affine | Pad]* <- Conv 1x1
    mid: list = []
    seq_nodes, seq_tensors = list(nodes), list(tensors)
    t = node.input[0]
    for _ in range(len(index.graph.node) + 1):
        j = index.producer.get(t)
        if j is None or not is_onnx(index.node(j)):
            return out
        prev = index.node(j)
        step = _affine(index, j, POST_AFFINE)  # between two convs an Add is no branch sum
        if step is not None:
            mid.insert(0, step[0])
            t = step[1]
        elif prev.op_type == "Pad":
            mid.insert(0, ("pad", j))
            t = prev.input[0]
        elif prev.op_type == "Conv":
            break
        else:
            return out
        seq_nodes.append(j)
        seq_tensors.append(index.node(j).output[0])
    seq_nodes.append(j)
    seq_tensors.append(prev.output[0])
    x = prev.input[0]
    w1 = index.const_info(_through_identity(index, prev.input[1])) if len(prev.input) > 1 else None
    first = f"{_label(index, j)}"
    if w1 is None or len(w1[1]) < 3 or any(k != 1 for k in w1[1][2:]):
        kernel = _kernel_text(w1[1][2:]) if w1 is not None and len(w1[1]) > 2 else "?"
        out.append((x, f"it is a sequence {kernel} -> {label} ({first} -> {where}); only a 1x1 "
                       "Conv before a kxk merges"))
        return out
    try:
        seq = _sequence(index, j, i, mid, seq_nodes, seq_tensors, affines, geometry, label)
    except _Refuse as why:
        out.append((x, str(why)))
        return out
    out.append((x, seq))
    return out


def _op_geometry(index: GraphIndex, i: int) -> _Geometry:
    node = index.node(i)
    where = _label(index, i)
    if node.op_type == "Conv":
        _check_conv(index, i)
        shape = index.const_info(_through_identity(index, node.input[1]))[1]
        kernel = tuple(shape[2:])
        given = attr(node, "kernel_shape")
        if given is not None and tuple(given) != kernel:
            raise _Refuse(f"{where} has kernel_shape {list(given)} but a {list(kernel)} weight")
        return _geometry(node, kernel, where)
    kernel = tuple(attr(node, "kernel_shape", []))  # AveragePool
    if not kernel:
        raise _Refuse(f"{where} has no kernel_shape")
    if attr(node, "ceil_mode", 0):
        raise _Refuse(f"{where} has ceil_mode=1 (partial windows are not a convolution)")
    if any(d != 1 for d in attr(node, "dilations", [1] * len(kernel))):
        raise _Refuse(f"{where} is dilated")
    geometry = _geometry(node, kernel, where)
    if not attr(node, "count_include_pad", 0) and any(geometry.begins + geometry.ends):
        raise _Refuse(f"{where} pads with count_include_pad=0 (border windows divide by fewer "
                      "taps: not a convolution)")
    return geometry


def _check_conv(index: GraphIndex, i: int) -> None:
    node = index.node(i)
    where = _label(index, i)
    if len(node.input) < 2 or not _is_const(index, node.input[1]):
        raise _Refuse(f"the weight of {where} is not a constant")
    dtype, shape = index.const_info(_through_identity(index, node.input[1]))
    if not np.issubdtype(dtype, np.floating):
        raise _Refuse(f"the weight of {where} is not float ({dtype})")
    if len(shape) < 3:
        raise _Refuse(f"{where} has a weight of rank {len(shape)}")
    if len(node.input) > 2 and node.input[2] and not _is_const(index, node.input[2]):
        raise _Refuse(f"the bias of {where} is not a constant")


def _sequence(index: GraphIndex, j: int, i: int, mid: list, nodes: list[int],
              tensors: list[str], affines: list[_Affine], geometry: _Geometry,
              label: str) -> _Branch:
    """The 1x1 Conv ``j`` -> ``mid`` -> Conv/AveragePool ``i`` as one branch of j's input."""
    first = index.node(j)
    where = f"{_label(index, j)} -> {_label(index, i)}"
    _check_conv(index, j)
    g1 = _geometry(first, tuple(index.const_info(_through_identity(index, first.input[1]))[1][2:]),
                   _label(index, j))
    if any(s != 1 for s in g1.strides):
        raise _Refuse(f"{where}: the 1x1 Conv has stride {list(g1.strides)}")
    r = len(geometry.kernel)
    if len(g1.kernel) != r:
        raise _Refuse(f"{where}: the two ops have different spatial ranks")
    m = index.const_info(_through_identity(index, first.input[1]))[1][0]
    # values of the intermediate where x = 0: c1 inside, each padding ring its own value
    b1 = _const(index, first.input[2]) if len(first.input) > 2 and first.input[2] else None
    value = np.zeros(m) if b1 is None else b1.astype(np.float64).reshape(-1)
    if value.size != m:
        raise _Refuse(f"the bias of {_label(index, j)} has {value.size} values for {m} channels")
    rings: list[tuple[str, np.ndarray]] = []
    begins, ends = list(g1.begins), list(g1.ends)
    stages: list[_Affine] = []
    for stage in mid:
        if isinstance(stage, _Affine):
            t, c = stage.vectors(m, r + 2, _label(index, stage.node))
            value = t * value + c
            rings = [(name, t * v + c) for name, v in rings]
            stages.append(stage)
            continue
        pad_begins, pad_ends, fill = _pad(index, stage[1], r)
        rings.append((_label(index, stage[1]), np.full(m, fill)))
        begins = [a + b for a, b in zip(begins, pad_begins)]
        ends = [a + b for a, b in zip(ends, pad_ends)]
    scale = max(float(np.abs(value).max(initial=0.0)), 1e-30)
    for name, v in rings:
        if not np.allclose(v, value, rtol=RTOL_PAD, atol=RTOL_PAD * scale):
            raise _Refuse(f"{where}: {name} pads with {v.flat[0]:.4g}, not the 1x1 output at a "
                          f"zero input (up to {np.abs(value).max():.4g}): not exact")
    if any(geometry.begins + geometry.ends) and np.any(value != 0):
        raise _Refuse(f"{where}: the kxk pads with zeros but the 1x1 output there is not zero "
                      f"(bias or BN shift up to {np.abs(value).max():.3g}): not exact")
    seq_geometry = _Geometry(geometry.kernel, geometry.strides, geometry.dilations,
                             tuple(a + b for a, b in zip(begins, geometry.begins)),
                             tuple(a + b for a, b in zip(ends, geometry.ends)))
    bns = sum(a.bn for a in affines) + sum(a.bn for a in stages)
    convs = 1 + int(index.node(i).op_type == "Conv")
    return _Branch(f"1x1>{label}", "seq", nodes, tensors, affines, seq_geometry, i, first=j,
                   mid=stages, convs=convs, bns=bns)


def _pad(index: GraphIndex, k: int, r: int) -> tuple[list[int], list[int], float]:
    node = index.node(k)
    where = _label(index, k)
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise _Refuse(f"{where} pads in mode '{mode}'")
    value = _computed_const(index, node.input[1]) if len(node.input) > 1 else None
    if value is None:
        raise _Refuse(f"the pads of {where} are not a constant")
    pads = [int(p) for p in value.reshape(-1)]
    rank = r + 2
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        value = _computed_const(index, node.input[3])
        if value is None:
            raise _Refuse(f"the axes of {where} are not a constant")
        axes = [int(a) % rank for a in value.reshape(-1)]
    if len(pads) != 2 * len(axes):
        raise _Refuse(f"{where} has {len(pads)} pads for {len(axes)} axes")
    full = [0] * 2 * rank
    for n, a in enumerate(axes):
        full[a], full[rank + a] = pads[n], pads[len(axes) + n]
    if any(p < 0 for p in full):
        raise _Refuse(f"{where} crops (negative pads)")
    if full[0] or full[1] or full[rank] or full[rank + 1]:
        raise _Refuse(f"{where} pads the batch or channel axis")
    fill = 0.0
    if len(node.input) > 2 and node.input[2]:
        value = _computed_const(index, node.input[2])
        if value is None:
            raise _Refuse(f"the constant_value of {where} is not a constant")
        fill = float(value.reshape(-1)[0])
    return full[2:rank], full[rank + 2:], fill


# ---- blocks -----------------------------------------------------------------------------------

@dataclass
class _Block:
    root: str  # label of the root Add/Sum
    x: str
    branches: list[_Branch]
    reason: str | None
    nodes: set[int] = field(default_factory=set)
    last: int = -1  # the node whose output the merged Conv produces
    output: str = ""
    constants: list[str] = field(default_factory=list)
    post: list[_Affine] = field(default_factory=list)
    geometry: _Geometry | None = None
    groups: int = 1
    out_channels: int = 0
    in_channels: int = 0
    primary: int = -1  # the Conv whose name and dtype the merged Conv takes


def _expandable(index: GraphIndex, tensor: str) -> int | None:
    """The Add/Sum producing ``tensor`` when it belongs to the tree reading it."""
    i = index.producer.get(tensor)
    if i is None or tensor in index.graph_outputs or len(index.readers(tensor)) != 1:
        return None
    node = index.node(i)
    return i if node.op_type in SUM_OPS and is_onnx(node) else None


def _find(index: GraphIndex) -> list[_Block]:
    blocks = []
    for i, node in enumerate(index.graph.node):
        if node.op_type not in SUM_OPS or not is_onnx(node) or not node.output:
            continue
        readers = index.readers(node.output[0])
        if (_expandable(index, node.output[0]) is not None
                and index.node(readers[0]).op_type in SUM_OPS and is_onnx(index.node(readers[0]))):
            continue  # an inner node of a larger tree
        block = _plan(index, i)
        if block is not None:
            blocks.append(block)
    return blocks


def _tree(index: GraphIndex, root: int) -> tuple[list[int], list[str], list[str]]:
    """(Add/Sum nodes, computed leaves, constant leaves) of the tree under ``root``."""
    nodes, leaves, constants = [], [], []

    def visit(i: int) -> None:
        nodes.append(i)
        for name in index.node(i).input:
            if not name:
                continue
            inner = _expandable(index, name)
            if inner is not None:
                visit(inner)
            elif _is_const(index, name):
                constants.append(name)
            else:
                leaves.append(name)

    visit(root)
    return nodes, leaves, constants


def _plan(index: GraphIndex, root: int) -> _Block | None:
    """The block under the Add/Sum ``root``: a merge plan, a refusal, or None when it is an
    ordinary sum (no tensor that two leaves are branches of, with a Conv among them)."""
    tree, leaves, constants = _tree(index, root)
    if len(leaves) < 2:
        return None
    interps = [_interpretations(index, leaf) for leaf in leaves]
    score: dict[str, list[int]] = {}
    for n, options in enumerate(interps):
        for tensor, branch in _first(options).items():
            s = score.setdefault(tensor, [0, 0, n])
            s[0] += 1
            s[1] += int(not isinstance(branch, _Branch) or branch.kind in ("conv", "seq"))
    shared = [(s[0], s[1], -s[2], t) for t, s in score.items() if s[0] >= 2 and s[1] >= 1]
    if not shared:
        return None
    x = max(shared)[3]
    label = index.labels[root]
    branches: list[_Branch] = []
    reason = None
    for leaf, options in zip(leaves, interps):
        match = _first(options).get(x)
        if match is None:
            reason = reason or f"branch '{leaf}' ({_what(index, leaf)}) does not read the " \
                               f"shared input '{x}'"
            continue
        if not isinstance(match, _Branch):
            reason = reason or match
            continue
        branches.append(match)
    block = _Block(label, x, branches, reason)
    if reason is not None:
        return block
    try:
        _check_readers(index, block, tree, leaves)
        _check_geometry(index, block, constants)
    except _Refuse as why:
        block.reason = str(why)
        return block
    block.nodes = set(tree) | {n for b in branches for n in b.nodes}
    block.constants = constants
    block.output = index.node(root).output[0]
    block.last = root
    _post(index, block)
    return block


def _first(options: list[tuple[str, object]]) -> dict:
    """tensor -> its nearest interpretation."""
    out: dict = {}
    for tensor, branch in options:
        out.setdefault(tensor, branch)
    return out


def _what(index: GraphIndex, tensor: str) -> str:
    i = index.producer.get(tensor)
    if i is None:
        return "a graph input"
    return f"output of {_label(index, i)}"


def _check_readers(index: GraphIndex, block: _Block, tree: list[int], leaves: list[str]) -> None:
    for branch in block.branches:
        for t in branch.tensors:
            producer = _label(index, index.producer[t])
            if t in index.graph_outputs:
                raise _Refuse(f"the output of {producer} is a graph output")
            if len(index.readers(t)) != 1:
                raise _Refuse(f"the output of {producer} is also read by "
                              f"{len(index.readers(t)) - 1} other node(s)")
    if block.x in index.initializers and block.x not in index.graph_inputs:
        raise _Refuse(f"the shared input '{block.x}' is a constant")


def _check_geometry(index: GraphIndex, block: _Block, constants: list[str]) -> None:
    """Groups, channels, strides, dilations and pads of the branches, or _Refuse."""
    convs = [b for b in block.branches if not b.diagonal]
    if not convs:
        raise _Refuse("no Conv branch")
    shapes = [_conv_shape(index, b) for b in convs]  # (out, in, groups)
    outs = {s[0] for s in shapes}
    if len(outs) > 1:
        raise _Refuse("output channels differ: " + _listing(convs, [s[0] for s in shapes]))
    groups = {s[2] for s in shapes}
    if len(groups) > 1:
        raise _Refuse("groups differ: " + _listing(convs, [s[2] for s in shapes]))
    ins = {s[1] for s in shapes}
    if len(ins) > 1:
        raise _Refuse("input channels differ: " + _listing(convs, [s[1] for s in shapes]))
    out, cin, g = outs.pop(), ins.pop(), groups.pop()
    for b in block.branches:
        if b.diagonal and out != cin:
            raise _Refuse(f"the {b.label} branch is per channel but the Convs map {cin} -> {out} "
                          "channels")
    rank = len(convs[0].geometry.kernel)
    for b in block.branches:
        if b.geometry is None:  # identity: 1x1, stride 1, no pads
            b.geometry = _Geometry((1,) * rank, (1,) * rank, (1,) * rank, (0,) * rank,
                                   (0,) * rank)
    geos = [b.geometry for b in block.branches]
    if any(len(geo.kernel) != rank for geo in geos):
        raise _Refuse("branches have different spatial ranks")
    kernel, strides, dilations, begins, ends = [], [], [], [], []
    for a in range(rank):
        s = {geo.strides[a] for geo in geos}
        if len(s) > 1:
            raise _Refuse("strides differ: " + _listing(block.branches,
                                                       [list(geo.strides) for geo in geos]))
        d = {geo.dilations[a] for geo in geos if geo.kernel[a] > 1} or {1}
        if len(d) > 1:
            raise _Refuse("dilations differ: " + _listing(
                block.branches, [list(geo.dilations) for geo in geos]))
        d = d.pop()
        extents = {geo.extent(a) for geo in geos}  # equal dilations where kernel > 1
        if len(extents) > 1:
            raise _Refuse(f"pads are not centre-aligned on spatial axis {a}: " + _listing(
                block.branches, [f"k={geo.kernel[a]} pads=({geo.begins[a]},{geo.ends[a]})"
                                 for geo in geos]))
        p = max(geo.begins[a] for geo in geos)
        if any((p - geo.begins[a]) % d for geo in geos):
            raise _Refuse(f"pads on spatial axis {a} differ by a non-multiple of the dilation {d}")
        k = max((p - geo.begins[a]) // d + geo.kernel[a] for geo in geos)
        kernel.append(k)
        strides.append(s.pop())
        dilations.append(d)
        begins.append(p)
        ends.append(extents.pop() + (k - 1) * d - p)
    for c in constants:
        _per_channel(_const(index, c).astype(np.float64), out, rank + 2, f"constant '{c}'")
    for b in block.branches:  # channel counts of every affine on the way (raises if wrong)
        n = cin if b.kind == "identity" else out
        _apply(b.affines, n, rank + 2, index)
        if b.kind == "seq":
            m = index.const_info(_through_identity(index, index.node(b.first).input[1]))[1][0]
            _apply(b.mid, m, rank + 2, index)
    block.geometry = _Geometry(tuple(kernel), tuple(strides), tuple(dilations), tuple(begins),
                               tuple(ends))
    block.groups, block.out_channels, block.in_channels = g, out, cin
    primary = max(convs, key=lambda b: (math.prod(b.geometry.kernel), -block.branches.index(b)))
    second = index.node(primary.node).op_type == "Conv"
    block.primary = primary.node if second else primary.first


def _conv_shape(index: GraphIndex, b: _Branch) -> tuple[int, int, int]:
    """(out channels, in channels, groups) of a Conv or sequence branch."""
    if b.kind == "conv":
        return _conv_dims(index, b.node)
    o1, c1, g1 = _conv_dims(index, b.first)
    node = index.node(b.node)
    if node.op_type == "AveragePool":
        return o1, c1, math.gcd(g1, o1)
    o2, c2, g2 = _conv_dims(index, b.node)
    if c2 != o1:
        raise _Refuse(f"{_label(index, b.first)} makes {o1} channels, {_label(index, b.node)} "
                      f"reads {c2}")
    return o2, c1, math.gcd(g1, g2)


def _conv_dims(index: GraphIndex, i: int) -> tuple[int, int, int]:
    node = index.node(i)
    shape = index.const_info(_through_identity(index, node.input[1]))[1]
    g = int(attr(node, "group", 1))
    if g < 1 or shape[0] % g:
        raise _Refuse(f"{_label(index, i)} has group {g} for {shape[0]} output channels")
    if len(node.input) > 2 and node.input[2]:
        size = int(np.prod(index.const_info(_through_identity(index, node.input[2]))[1]))
        if size != shape[0]:
            raise _Refuse(f"the bias of {_label(index, i)} has {size} values for {shape[0]} "
                          "channels")
    return shape[0], shape[1] * g, g


def _listing(branches: list[_Branch], values: list) -> str:
    return ", ".join(f"{v} ({b.label})" for b, v in zip(branches, values))


def _post(index: GraphIndex, block: _Block) -> None:
    """Absorb the BN / Mul / Add / Sub / Div by per-channel constants after the sum."""
    t = block.output
    rank = len(block.geometry.kernel) + 2
    for _ in range(len(index.graph.node)):
        readers = index.readers(t)
        if t in index.graph_outputs or len(readers) != 1:
            return
        step = _affine(index, readers[0], POST_AFFINE)
        if step is None or step[1] != t:
            return
        try:
            step[0].vectors(block.out_channels, rank, "")
        except _Refuse:
            return
        block.post.append(step[0])
        block.nodes.add(readers[0])
        block.last = readers[0]
        t = block.output = index.node(readers[0]).output[0]


# ---- merging ----------------------------------------------------------------------------------

def _merge(index: GraphIndex, block: _Block, taken: set, names: set
           ) -> tuple[onnx.NodeProto, dict]:
    """The merged Conv of ``block`` (new initializers appended to the graph) and its table row."""
    geo, g, out, cin = block.geometry, block.groups, block.out_channels, block.in_channels
    rank = len(geo.kernel) + 2
    primary = index.node(block.primary)
    w = np.zeros((out, cin // g) + geo.kernel)
    b = np.zeros(out)
    for branch in block.branches:
        bw, bb = _branch_kernel(index, branch, block)
        bgeo = branch.geometry
        offsets = [(geo.begins[a] - bgeo.begins[a]) // geo.dilations[a]
                   for a in range(len(geo.kernel))]
        k = bw.shape[2:]
        region = tuple(slice(o, o + n) for o, n in zip(offsets, k))
        w[(slice(None), slice(None)) + region] += bw
        b += bb
    for c in block.constants:
        b += _per_channel(_const(index, c).astype(np.float64), out, rank, c)
    T, C = _apply(block.post, out, rank, index)
    w *= T.reshape((-1,) + (1,) * (w.ndim - 1))
    b = T * b + C
    dtype = index.const_info(_through_identity(index, primary.input[1]))[0]
    name = unique_name(primary.name or f"{block.root}_conv", names)
    w_name = unique_name(f"{name}.weight", taken)
    b_name = unique_name(f"{name}.bias", taken)
    index.graph.initializer.append(numpy_helper.from_array(w.astype(dtype), w_name))
    index.graph.initializer.append(numpy_helper.from_array(b.astype(dtype), b_name))
    conv = helper.make_node(
        "Conv", [block.x, w_name, b_name], [block.output], name=name,
        kernel_shape=list(geo.kernel), strides=list(geo.strides), dilations=list(geo.dilations),
        pads=list(geo.begins) + list(geo.ends), group=g)
    counts: dict[str, int] = {}
    for br in sorted(block.branches, key=_order):
        counts[br.label] = counts.get(br.label, 0) + 1
    branches = " + ".join(f"{n}x {lab}" if n > 1 else lab for lab, n in counts.items())
    after = [a.kind for a in block.post]
    convs = sum(br.convs for br in block.branches)
    bns = sum(br.bns for br in block.branches) + sum(a.bn for a in block.post)
    detail = (f"{branches}{' then ' + ', '.join(after) if after else ''} -> "
              f"{_kernel_text(geo.kernel)} Conv, group {g}")
    return conv, MergedBlock(block.root, name, block.x, branches, after,
                             _kernel_text(geo.kernel), g, list(geo.strides), convs, 1, bns,
                             detail)


def _order(branch: _Branch) -> tuple:
    """Table order: Conv branches by kernel size (largest first), sequences, average pools,
    then identity branches."""
    rank = {"conv": 0, "seq": 1, "avg": 2, "identity": 3}[branch.kind]
    size = math.prod(branch.geometry.kernel) if branch.geometry else 1
    return (rank, -size, branch.label)


def _branch_kernel(index: GraphIndex, branch: _Branch, block: _Block
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [out, cin/groups, *k], bias [out]) of one branch in the block's groups, float64."""
    g, out, cin = block.groups, block.out_channels, block.in_channels
    rank = len(block.geometry.kernel) + 2
    if branch.diagonal:
        k = (1,) * (rank - 2) if branch.kind == "identity" else branch.geometry.kernel
        per = np.full(cin, 1.0 / math.prod(k))
        bias = np.zeros(cin)
        T, C = _apply(branch.affines, cin, rank, index)
        per, bias = T * per, T * bias + C
        w = np.zeros((cin, cin // g) + tuple(k))
        w[np.arange(cin), np.arange(cin) % (cin // g)] = per.reshape((-1,) + (1,) * (rank - 2))
        return w, bias
    if branch.kind == "conv":
        w, bias = _conv_weights(index, branch.node)
    else:
        w, bias = _sequence_weights(index, branch, g, rank)
    T, C = _apply(branch.affines, out, rank, index)
    return w * T.reshape((-1,) + (1,) * (w.ndim - 1)), T * bias + C


def _conv_weights(index: GraphIndex, i: int) -> tuple[np.ndarray, np.ndarray]:
    node = index.node(i)
    w = _const(index, node.input[1]).astype(np.float64)
    has_bias = len(node.input) > 2 and node.input[2]
    bias = (_const(index, node.input[2]).astype(np.float64).reshape(-1) if has_bias
            else np.zeros(w.shape[0]))
    return w, bias


def _sequence_weights(index: GraphIndex, branch: _Branch, g: int, rank: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """W[o, c] = sum_m W2[o, m] T[m] W1[m, c] and b = b2 + sum_{m, taps} W2[o, m] c1[m], in
    ``g`` groups (g divides both convs' groups)."""
    w1, b1 = _conv_weights(index, branch.first)
    g1 = int(attr(index.node(branch.first), "group", 1))
    m = w1.shape[0]
    T, C = _apply(branch.mid, m, rank, index)
    w1 = w1.reshape(w1.shape[:2]) * T[:, None]  # [M, C/g1]
    c1 = T * b1 + C
    second = index.node(branch.node)
    if second.op_type == "Conv":
        w2, b2 = _conv_weights(index, branch.node)
        g2 = int(attr(second, "group", 1))
    else:  # AveragePool: depthwise 1/prod(k) on the M channels
        k = branch.geometry.kernel
        w2, b2, g2 = np.full((m, 1) + k, 1.0 / math.prod(k)), np.zeros(m), m
    out = w2.shape[0]
    dense1 = _grouped_dense(w1, g1, g)  # [g, M/g, C/g]
    dense2 = _grouped_dense(w2, g2, g)  # [g, O/g, M/g, *k]
    w = np.einsum("gom...,gmc->goc...", dense2, dense1).reshape(
        (out, dense1.shape[2]) + w2.shape[2:])
    taps = w2.reshape(w2.shape[:2] + (-1,)).sum(axis=2)  # [O, M/g2]
    bias = b2 + np.einsum("gom,gm->go", taps.reshape(g2, out // g2, -1),
                          c1.reshape(g2, -1)).reshape(-1)
    return w, bias


def _grouped_dense(w: np.ndarray, groups: int, g: int) -> np.ndarray:
    """The weight [O, Cin/groups, *k] of a ``groups``-grouped conv as [g, O/g, Cin/g, *k],
    dense within each of ``g`` coarser groups (``g`` divides ``groups``)."""
    o, cpg = w.shape[:2]
    q = groups // g
    opg = o // groups
    rest = w.shape[2:]
    fine = w.reshape((g, q, opg, cpg) + rest)
    out = np.zeros((g, o // g, cpg * q) + rest)
    for r in range(q):
        out[:, r * opg:(r + 1) * opg, r * cpg:(r + 1) * cpg] = fine[:, r]
    return out


# ---- clean-up ---------------------------------------------------------------------------------

def _count(graph: onnx.GraphProto, op: str) -> int:
    return sum(1 for n in graph.node if n.op_type == op and is_onnx(n))


