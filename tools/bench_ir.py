"""Should onnxrep adopt onnx-ir (PyPI ``onnx-ir``) instead of GraphIndex over ModelProto?

On the 44.8M-parameter Conv chain of ``tools/bench_optimize.py``, in both layouts (weights
inside the .onnx file, as that tool builds it, and in one external ``.data`` file), each
measurement in its own child process, repeated, medians printed:

  rep load+save  onnxrep.ir.model.load -> onnxrep.ir.model.save
  rep CLE        onnxrep.ir.model.load -> EqualizeCrossLayer()(model) -> onnxrep.ir.model.save
  ir load+save   onnx_ir.load -> onnx_ir.save(external_data=...)
  ir CLE         onnx_ir.load -> cle_ir(model) below -> onnx_ir.save(external_data=...)

Time is the wall time from after the imports to after the save; peak RSS is the child's
whole-process VmHWM (imports included), also shown minus the RSS right after the imports.
Then every initializer of the onnx-ir output is compared with onnxrep's (max abs diff), and
both are run once in onnxruntime.

``cle_ir`` is CLE written against onnx-ir: pair finding, weight reduction and write-back.
The scale arithmetic (``_Layer``, ``_equalize``: chain balancing, relaxed rounds, clamping)
touches no graph, so both sides share it from ``onnxrep.passes.equalize``. ``cle_gi`` is
the same feature set written against GraphIndex, for a like-for-like line count; it is run
too, and must match as well. Features of both: Conv -> (Relu | GlobalAveragePool)* ->
Conv, and Conv -> ... GlobalAveragePool -> Flatten(axis=1) -> Gemm(transA=0); weights and
biases must be unshared float initializers.

usage: python tools/bench_ir.py [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxrep.passes.equalize import ChainPair, EqualizeConfig, _equalize, _Layer  # noqa: E402

FLOATS = (np.float16, np.float32, np.float64)
PATH_OPS = ("Relu", "GlobalAveragePool")


# ---------------------------------------------------------------- CLE against onnx-ir
def cle_ir(model) -> int:
    pairs = ir_pairs(model.graph)
    layers = {}
    for pair in pairs:
        for node in (pair.first, pair.second):
            if node not in layers:
                layers[node] = ir_reduce(node)
    _equalize(layers, pairs, EqualizeConfig())
    for layer in layers.values():
        ir_write_back(layer)
    return len(pairs)


def ir_pairs(graph) -> list[ChainPair]:
    pairs = []
    for node in graph:
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and ir_layer_ok(node, True):
            pair = ir_follow(node)
            if pair is not None:
                pairs.append(pair)
    return pairs


def ir_const_ok(value) -> bool:
    return (value is not None and value.is_initializer() and not value.is_graph_input()
            and value.const_value is not None and len(value.uses()) == 1)


def ir_layer_ok(node, first: bool) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (ir_const_ok(weight) and weight.const_value.dtype.numpy() in FLOATS
            and (not first or bias is None or ir_const_ok(bias)))


def ir_follow(first) -> ChainPair | None:
    value, path, flat = first.outputs[0], [], False
    while not value.is_graph_output() and len(value.uses()) == 1:
        node, slot = value.uses()[0]
        if slot != 0 or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in ("Conv", "Gemm"):
            ok = node.op_type == ("Gemm" if flat else "Conv") and ir_layer_ok(node, False)
            ok = ok and not node.attributes.get_int("transA", 0)
            return ChainPair(first, node, tuple(path)) if ok else None
        after_gap = bool(path) and path[-1].op_type == "GlobalAveragePool"
        if node.op_type == "Flatten" and not flat and after_gap:
            if node.attributes.get_int("axis", 1) != 1:
                return None
            flat = True
        elif flat or node.op_type not in PATH_OPS:
            return None
        path.append(node)
        value = node.outputs[0]
    return None


def ir_reduce(node) -> _Layer:
    weight = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    w = np.abs(weight.const_value.numpy())
    if node.op_type == "Conv":
        r = w.reshape(w.shape[0], w.shape[1], -1).max(axis=2)
        return _Layer(node, weight, bias, "Conv", node.attributes.get_int("group", 1), r)
    if node.attributes.get_int("transB", 0):
        w = w.T
    return _Layer(node, weight, bias, "Gemm", 1, np.ascontiguousarray(w.T))


def ir_write_back(layer: _Layer) -> None:
    import onnx_ir as ir

    if np.all(layer.out_factor == 1) and np.all(layer.in_factor == 1):
        return
    w = layer.weight.const_value.numpy()
    if layer.op == "Conv":
        cout, cin_g, g = w.shape[0], w.shape[1], layer.groups
        inf = np.broadcast_to(layer.in_factor.reshape(g, 1, cin_g),
                              (g, cout // g, cin_g)).reshape(cout, cin_g)
        factor = layer.out_factor[:, None] * inf
        w = w * factor.reshape(factor.shape + (1,) * (w.ndim - 2)).astype(w.dtype)
    elif layer.node.attributes.get_int("transB", 0):
        w = w * (layer.out_factor[:, None] * layer.in_factor[None, :]).astype(w.dtype)
    else:
        w = w * (layer.in_factor[:, None] * layer.out_factor[None, :]).astype(w.dtype)
    layer.weight.const_value = ir.Tensor(w, name=layer.weight.name)
    if layer.bias is not None and np.any(layer.out_factor != 1):
        b = layer.bias.const_value.numpy()
        scaled = (b.astype(np.float64).reshape(-1) * layer.out_factor).reshape(b.shape)
        layer.bias.const_value = ir.Tensor(scaled.astype(b.dtype), name=layer.bias.name)


# ---------------------------------------------------------------- the same against GraphIndex
def cle_gi(model) -> int:
    from onnxrep.ir.graph import GraphIndex

    index = GraphIndex(model.graph)
    pairs = gi_pairs(index)
    layers = {}
    for pair in pairs:
        for i in (pair.first, pair.second):
            if i not in layers:
                layers[i] = gi_reduce(index, i)
    _equalize(layers, pairs, EqualizeConfig())
    for layer in layers.values():
        gi_write_back(index, layer)
    return len(pairs)


def gi_pairs(index) -> list[ChainPair]:
    pairs = []
    for i, node in enumerate(index.graph.node):
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and gi_layer_ok(index, i, True):
            pair = gi_follow(index, i)
            if pair is not None:
                pairs.append(pair)
    return pairs


def gi_const_ok(index, name: str) -> bool:
    return bool(name) and name in index.initializers and index.is_const(name) and not index.shared(name)


def gi_layer_ok(index, i: int, first: bool) -> bool:
    node = index.node(i)
    weight = node.input[1] if len(node.input) > 1 else ""
    bias = node.input[2] if len(node.input) > 2 else ""
    return (gi_const_ok(index, weight) and index.const_info(weight)[0] in FLOATS
            and (not first or not bias or gi_const_ok(index, bias)))


def gi_follow(index, first: int) -> ChainPair | None:
    from onnxrep.ir.graph import attr

    tensor, path, flat = index.node(first).output[0], [], False
    while tensor not in index.graph_outputs and len(index.readers(tensor)) == 1:
        i = index.readers(tensor)[0]
        node = index.node(i)
        if node.input[0] != tensor or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in ("Conv", "Gemm"):
            ok = node.op_type == ("Gemm" if flat else "Conv") and gi_layer_ok(index, i, False)
            ok = ok and not attr(node, "transA", 0)
            return ChainPair(first, i, tuple(path)) if ok else None
        after_gap = bool(path) and index.node(path[-1]).op_type == "GlobalAveragePool"
        if node.op_type == "Flatten" and not flat and after_gap:
            if attr(node, "axis", 1) != 1:
                return None
            flat = True
        elif flat or node.op_type not in PATH_OPS:
            return None
        path.append(i)
        tensor = node.output[0]
    return None


def gi_reduce(index, i: int) -> _Layer:
    from onnxrep.ir.graph import attr

    node = index.node(i)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = np.abs(index.const(node.input[1]))
    if node.op_type == "Conv":
        r = w.reshape(w.shape[0], w.shape[1], -1).max(axis=2)
        return _Layer(i, node.input[1], bias, "Conv", int(attr(node, "group", 1)), r)
    if attr(node, "transB", 0):
        w = w.T
    return _Layer(i, node.input[1], bias, "Gemm", 1, np.ascontiguousarray(w.T))


def gi_write_back(index, layer: _Layer) -> None:
    from onnxrep.ir.graph import attr

    if np.all(layer.out_factor == 1) and np.all(layer.in_factor == 1):
        return
    w = index.const(layer.weight)
    if layer.op == "Conv":
        cout, cin_g, g = w.shape[0], w.shape[1], layer.groups
        inf = np.broadcast_to(layer.in_factor.reshape(g, 1, cin_g),
                              (g, cout // g, cin_g)).reshape(cout, cin_g)
        factor = layer.out_factor[:, None] * inf
        w = w * factor.reshape(factor.shape + (1,) * (w.ndim - 2)).astype(w.dtype)
    elif attr(index.node(layer.node), "transB", 0):
        w = w * (layer.out_factor[:, None] * layer.in_factor[None, :]).astype(w.dtype)
    else:
        w = w * (layer.in_factor[:, None] * layer.out_factor[None, :]).astype(w.dtype)
    index.set_const(layer.weight, w)
    if layer.bias is not None and np.any(layer.out_factor != 1):
        b = index.const(layer.bias).astype(np.float64)
        index.set_const(layer.bias, (b.reshape(-1) * layer.out_factor).reshape(b.shape))


IR_PORT = [cle_ir, ir_pairs, ir_const_ok, ir_layer_ok, ir_follow, ir_reduce, ir_write_back]
GI_PORT = [cle_gi, gi_pairs, gi_const_ok, gi_layer_ok, gi_follow, gi_reduce, gi_write_back]


# ---------------------------------------------------------------- child process
def hwm_kb() -> int:
    """Peak RSS of this process image (VmHWM), in kB; unlike ru_maxrss after a fork+exec it
    carries nothing over from the parent."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0])


def run_child(mode: str, src: str, dst: str) -> None:
    if mode.startswith("rep") or mode == "gi_cle":
        from onnxrep.ir import model as io
        from onnxrep.passes.equalize import EqualizeCrossLayer
    else:
        import onnx_ir as ir
    base = hwm_kb()
    t0 = time.perf_counter()
    pairs = None
    model = io.load(src) if mode in ("rep_io", "rep_cle", "gi_cle") else ir.load(src)
    t1 = time.perf_counter()
    if mode == "rep_cle":
        pairs = EqualizeCrossLayer()(model).summary.pairs
    elif mode == "gi_cle":
        pairs = cle_gi(model)
    elif mode == "ir_cle":
        pairs = cle_ir(model)
    t2 = time.perf_counter()
    if mode.startswith("ir"):
        ir.save(model, dst, external_data=Path(dst).name + ".data")
    else:
        io.save(model, dst, force=True)
    t3 = time.perf_counter()
    print(json.dumps({"seconds": t3 - t0, "load": t1 - t0, "cle": t2 - t1, "save": t3 - t2,
                      "peak_kb": hwm_kb(), "base_kb": base, "pairs": pairs}))


def run_check(src: str, reference: str, others: list[str]) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    def weights(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}

    ref, orig = weights(reference), weights(src)
    changed = sum(not np.array_equal(ref[k], orig[k]) for k in ref)
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)

    def infer(path):
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    y_ref, y_src = infer(reference), infer(src)
    out = {"weights": len(ref), "changed_by_cle": changed,
           "ort_max_abs_logit": float(np.abs(y_ref).max()),
           "ort_max_diff_vs_input": float(np.abs(y_ref - y_src).max())}
    for path in others:
        w = weights(path)
        assert set(w) == set(ref), f"{path}: initializer names differ"
        out[Path(path).name] = {
            "max_abs_diff": max(float(np.abs(w[k].astype(np.float64) - ref[k]).max()) for k in ref),
            "dtype_shape_equal": all(w[k].dtype == ref[k].dtype and w[k].shape == ref[k].shape
                                     for k in ref),
            "ort_max_diff": float(np.abs(infer(path) - y_ref).max())}
    print(json.dumps(out))


# ---------------------------------------------------------------- line counts
def code_lines(functions) -> int:
    """Lines of code: no blank lines, comment-only lines, docstrings or local imports."""
    total = 0
    for fn in functions:
        source = textwrap.dedent(inspect.getsource(fn))
        skip = set()
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                skip.update(range(body[0].lineno, body[0].end_lineno + 1))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                skip.update(range(node.lineno, node.end_lineno + 1))
        for n, line in enumerate(source.splitlines(), 1):
            if n not in skip and line.strip() and not line.strip().startswith("#"):
                total += 1
    return total


def line_report() -> list[str]:
    from onnxrep.ir import graph
    from onnxrep.passes import equalize as eq

    full = [eq.EqualizeCrossLayer.call, eq.find_pairs, eq._first_layer_problem,
            eq._weight_problem, eq._ChainFinder, eq._load_layers, eq._reduce, eq._write_back]
    shared = [eq._Layer, eq._equalize, eq._chains, eq._balance, eq.channel_scales,
              eq._equalizable, eq._dead]
    ir_n, gi_n = code_lines(IR_PORT), code_lines(GI_PORT)
    return [
        "| CLE graph-facing code (pair finding + reduce + write-back + driver) | lines |",
        "|---|---|",
        f"| against onnx-ir (`cle_ir` and helpers, this file) | {ir_n} |",
        f"| against GraphIndex, same features (`cle_gi` and helpers, this file) | {gi_n} |",
        f"| against GraphIndex, all features (equalize.py: call, find_pairs, _ChainFinder, "
        f"_reduce, _write_back, ...) | {code_lines(full)} |",
        f"| shared numeric core, IR-independent (_Layer, _equalize, _balance, channel_scales, "
        f"...) | {code_lines(shared)} |",
        f"| GraphIndex and its helpers (onnxrep/ir/graph.py, whole module) | "
        f"{code_lines([graph])} |",
        f"lines ratio (onnx-ir / GraphIndex, same features): {ir_n / gi_n:.2f}",
    ]


# ---------------------------------------------------------------- driver
MODES = [("rep_io", "onnxrep load + save"), ("rep_cle", "onnxrep load + CLE + save"),
         ("gi_cle", "onnxrep load + cle_gi + save"),
         ("ir_io", "onnx-ir load + save"), ("ir_cle", "onnx-ir load + cle_ir + save")]


def child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def disk_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="directory to keep the models in")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "check":
            return run_check(args.child[1], args.child[2], args.child[3:])
        if args.child[0] == "build":
            import onnx
            from tools.bench_optimize import build

            src, ext = Path(args.child[1]), Path(args.child[2])
            params = build(src)
            onnx.save(onnx.load(str(src)), str(ext), save_as_external_data=True,
                      all_tensors_to_one_file=True, location=ext.name + ".data", size_threshold=1024)
            return print(json.dumps({"params": params}))
        return run_child(*args.child)

    import onnx_ir

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; python {sys.version.split()[0]}, "
          f"onnx-ir {onnx_ir.__version__}, repeat {args.repeat} (medians)")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        inline, external = root / "chain.onnx", root / "chain_ext.onnx"
        params = child("build", str(inline), str(external))["params"]
        for layout, src in (("inline", inline), ("external", external)):
            size = disk_size(src)
            print(f"\n## input: {params / 1e6:.1f}M parameters, weights {layout}, "
                  f"{size / 2**20:.1f} MiB on disk")
            runs = {mode: [] for mode, _ in MODES}
            for _ in range(args.repeat):  # interleaved, so drift in machine load hits all alike
                for mode, _label in MODES:
                    runs[mode].append(child(mode, str(src), str(root / f"{layout}.{mode}.onnx")))
            med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "load", "cle", "save",
                                                                           "peak_kb", "base_kb")}
                   for m, rs in runs.items()}
            print("| run | total s | load s | CLE s | save s | peak RSS (MiB) | peak / file "
                  "| (peak - after imports) / file | pairs |")
            print("|---|---|---|---|---|---|---|---|---|")
            for mode, label in MODES:
                m = med[mode]
                print(f"| {label} | {m['seconds']:.2f} | {m['load']:.2f} | "
                      f"{m['cle']:.2f} | {m['save']:.2f} | {m['peak_kb'] / 1024:.0f} | "
                      f"{m['peak_kb'] * 1024 / size:.2f} | "
                      f"{(m['peak_kb'] - m['base_kb']) * 1024 / size:.2f} | "
                      f"{runs[mode][0]['pairs'] if runs[mode][0]['pairs'] is not None else '-'} |")
            for a, b, what in (("ir_io", "rep_io", "load+save"), ("ir_cle", "rep_cle", "load+CLE+save")):
                ta, tb = med[a]["seconds"], med[b]["seconds"]
                print(f"ratio onnx-ir / onnxrep, {what}: time {ta / tb:.2f}, "
                      f"peak RSS {med[a]['peak_kb'] / med[b]['peak_kb']:.2f}, "
                      f"growth {(med[a]['peak_kb'] - med[a]['base_kb']) / (med[b]['peak_kb'] - med[b]['base_kb']):.2f}")
            print(f"ratio onnx-ir / onnxrep, CLE step alone: "
                  f"{med['ir_cle']['cle'] / med['rep_cle']['cle']:.2f}")
            for mode in ("ir_io", "ir_cle", "rep_cle"):
                out = root / f"{layout}.{mode}.onnx"
                print(f"{mode} output: {disk_size(out) / 2**20:.1f} MiB")
            check = child("check", str(src), str(root / f"{layout}.rep_cle.onnx"),
                          str(root / f"{layout}.ir_cle.onnx"), str(root / f"{layout}.gi_cle.onnx"))
            print(f"weights vs onnxrep CLE output: {json.dumps(check)}")
    print()
    print("\n".join(line_report()))


if __name__ == "__main__":
    main()
