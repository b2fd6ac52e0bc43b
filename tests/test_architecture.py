"""The package's shape: no import cycle, torch only under onnxrep/training, a light `import onnxrep`,
a public API that resolves, and modules that are modules."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import onnxrep

PACKAGE = Path(onnxrep.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """onnxrep modules and top-level third-party packages ``path`` imports, at any depth."""
    found = set()
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            # `from onnxrep.ptq import sensitivity` imports the submodule
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_no_import_cycle_among_onnxrep_modules():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    edges = {m: {d for d in deps if not (MODULES[m].name == "__init__.py"
                                         and d.startswith(m + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d])
                            if d in path else f"import cycle through {d}")
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_torch_is_imported_only_under_qat():
    outside = [m for m, p in MODULES.items()
               if any(i == "torch" or i.startswith("torch.") for i in _imports(p))
               and not m.startswith("onnxrep.training.")
               and m != "onnxrep.cli.qat"]  # imports torch lazily, to say it is missing
    assert outside == []


def test_import_onnxrep_loads_neither_torch_nor_matplotlib():
    code = ("import sys, onnxrep, onnxrep.cli; onnxrep.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    for name in onnxrep.__all__:
        assert getattr(onnxrep, name) is not None, name
    assert set(onnxrep.__all__) <= set(dir(onnxrep))
    public = {n for n in vars(onnxrep) if not n.startswith("_")} - {
        m.rpartition(".")[2] for m in MODULES}
    assert public <= set(onnxrep.__all__)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_as_a_module(name):
    if name == "onnxrep.__main__":
        pytest.skip("running it is the CLI")
    if name.startswith("onnxrep.training.") and name != "onnxrep.training.config":
        pytest.importorskip("torch")
    module = importlib.import_module(name)
    assert type(module).__name__ == "module"


def test_no_module_is_named_like_a_function_the_package_re_exports():
    top = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    functions = {n for n in onnxrep.__all__ if n[0].islower()}
    assert top & functions == set()
