"""The layers of docs/developer/architecture.md, read from the source: who imports whom inside monai_ckpt."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_ckpt"

# A module may import modules of a lower rank, and modules of its own package (networks.unet -> networks.base);
# modules of the same rank know nothing of each other (profiling measures any network without importing one).
RANKS = {
    "monai_ckpt.io": 0,
    "monai_ckpt.arguments": 0,
    "monai_ckpt.lazy": 0,
    "monai_ckpt.checkpoint": 0,
    "monai_ckpt.policies": 1,
    "monai_ckpt.chain": 2,
    "monai_ckpt.networks": 3,
    "monai_ckpt.data": 3,
    "monai_ckpt.profiling": 3,
    "monai_ckpt.planner": 4,
    "monai_ckpt.plots": 5,
    "monai_ckpt.benchmark": 6,
    "monai_ckpt.plan": 6,
    "monai_ckpt.handlers": 6,
    "monai_ckpt.inferers": 6,
    "monai_ckpt.nnunet": 6,
    "monai_ckpt": 9,
}
# The one upward arrow: a {"budget_gb": X} policy plans on the first training forward (imported there, lazily).
LAZY_UPWARD = {("monai_ckpt.networks.base", "monai_ckpt.planner")}
CORE = ("monai_ckpt.checkpoint", "monai_ckpt.policies", "monai_ckpt.chain")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in ``path``; relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out += [(t, id(node) in top) for t in targets]
    return out


def _rank(module: str) -> int:
    best = max((k for k in RANKS if module == k or module.startswith(k + ".")), key=len)
    return RANKS[best]


def _group(module: str) -> str:
    return ".".join(module.split(".")[:2])


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {
    name: {(t, top) for t, top in _imports(path) if t.startswith("monai_ckpt") and t != name}
    for name, path in MODULES.items()
}


def _violations(graph: dict[str, set[tuple[str, bool]]]) -> list[str]:
    out = []
    for module, imports in sorted(graph.items()):
        for target, top in sorted(imports):
            if (module, target) in LAZY_UPWARD:
                if top:
                    out.append(f"{module} must import {target} inside a function (the budget policy's lazy arrow)")
                continue
            same_package = _group(module) == _group(target) and module != "monai_ckpt"
            if not (same_package or _rank(target) < _rank(module)):
                out.append(f"{module} imports {target}: an arrow up or across the layers")
    return out


def test_imports_point_down():
    assert _violations(GRAPH) == []


def test_the_rules_catch_violations():
    """The checker itself: the import circles this layout removed are caught."""
    graph = {**GRAPH, "monai_ckpt.profiling": GRAPH["monai_ckpt.profiling"] | {("monai_ckpt.networks.base", False)},
             "monai_ckpt.plots": GRAPH["monai_ckpt.plots"] | {("monai_ckpt.benchmark", True)},
             "monai_ckpt.networks.base": GRAPH["monai_ckpt.networks.base"] | {("monai_ckpt.planner", True)}}
    assert _violations(graph) == [
        "monai_ckpt.networks.base must import monai_ckpt.planner inside a function (the budget policy's lazy arrow)",
        "monai_ckpt.plots imports monai_ckpt.benchmark: an arrow up or across the layers",
        "monai_ckpt.profiling imports monai_ckpt.networks.base: an arrow up or across the layers",
    ]


def test_no_import_cycles():
    edges = {m: {t for t, _ in GRAPH[m] if (m, t) not in LAZY_UPWARD and t in MODULES} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", CORE)
def test_core_stands_on_torch_alone(module):
    third_party = {t.split(".")[0] for t, _ in _imports(MODULES[module])} - {"monai_ckpt"}
    import sys

    assert third_party <= {"torch", "__future__", *sys.stdlib_module_names}, third_party


# nnU-Net is optional (pip install monai-ckpt[nnunet]): only monai_ckpt.nnunet may import it, so `import monai_ckpt`
# and every other module work without it
OPTIONAL = ("nnunetv2", "dynamic_network_architectures", "timm", "torchvision")


def test_only_monai_ckpt_nnunet_imports_nnunet():
    outside = {(name, target) for name, path in MODULES.items() if not name.startswith("monai_ckpt.nnunet")
               for target, _ in _imports(path) if target.split(".")[0] in OPTIONAL}
    assert outside == set()
    networks = _imports(MODULES["monai_ckpt.nnunet.networks"])
    assert any(t.startswith("dynamic_network_architectures") for t, _ in networks)


def test_import_monai_ckpt_without_nnunet_installed():
    """In a process where nnU-Net's packages cannot be imported, the package and its CLIs' modules still import."""
    import subprocess
    import sys

    code = ("import sys\nclass Hide:\n    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {OPTIONAL!r}: raise ModuleNotFoundError('hidden: ' + name, name=name)\n"
            "sys.meta_path.insert(0, Hide())\nimport monai_ckpt, monai_ckpt.plan, monai_ckpt.benchmark\n"
            "try:\n    import monai_ckpt.nnunet\nexcept ImportError as e:\n    print('nnunet:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nnunet: " in proc.stdout and "monai-ckpt[nnunet]" in proc.stdout
