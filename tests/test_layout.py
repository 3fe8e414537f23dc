"""The two layers: the core (`diffusion/`) runs with torch and numpy alone and never imports the
platform layer (`diffusion/platform/`), the package has no import cycle, MLflow is imported by
one module only, and no function is longer than 100 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion"
BLOCKED = ("ray", "mlflow", "fastapi", "pyarrow", "boto3", "pydantic", "diffusers")
SOURCES = [PACKAGE.parent / d for d in ("diffusion", "jobs", "tune", "bench", "cluster", "tests")]
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in it (at module level or in a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (
                f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
            )
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import tracking`
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_core_runs_with_torch_and_numpy_alone(tmp_path):
    """In a fresh interpreter where ray, mlflow, fastapi, pyarrow, boto3, pydantic and diffusers
    cannot be imported: every core module imports, a checkpoint is written, loaded from its run
    folder and sampled, and a PNG grid is saved."""
    core = sorted(module_name(p) for p in PACKAGE.glob("*.py"))
    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
for name in {core!r}:
    importlib.import_module(name)
import torch
from diffusion import RECIPES, Sampler, SamplerSettings, load_checkpoint, read_checkpoint, save_grid
from diffusion.checkpoint import save_checkpoint
from diffusion.training import build_state
config = RECIPES["tiny"]
state = build_state(config, torch.device("cpu"))
save_checkpoint(r"{tmp_path}/run/checkpoint-000000007", state, config)
model, ema_model, loaded = load_checkpoint(r"{tmp_path}/run")
sampler = Sampler.from_checkpoint(read_checkpoint(r"{tmp_path}/run"), batch_size=2)
x = sampler.samples([1, 2], SamplerSettings("ddim", 3))
save_grid(x, r"{tmp_path}/grid.png")
print(loaded.model, tuple(x.shape), sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["tiny", "(2,", "3,", "32,", "32)", "[]"]
    assert (tmp_path / "grid.png").stat().st_size > 0


def is_platform(module: str) -> bool:
    return module == "diffusion.platform" or module.startswith("diffusion.platform.")


def test_the_core_never_imports_the_platform():
    """Imports anywhere in a module count (a function's import is a dependency too)."""
    edges = {(a, b) for a, targets in graph().items() for b in targets}
    core_to_platform = sorted((a, b) for a, b in edges if not is_platform(a) and is_platform(b))
    assert core_to_platform == [], "the core imports the platform: " + ", ".join(
        f"{a} -> {b}" for a, b in core_to_platform
    )


def test_the_core_check_finds_a_planted_edge(monkeypatch):
    planted = {**graph(), "diffusion.checkpoint": graph()["diffusion.checkpoint"] | {"diffusion.platform.checkpoints"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: planted)
    with pytest.raises(AssertionError, match="diffusion.checkpoint -> diffusion.platform.checkpoints"):
        test_the_core_never_imports_the_platform()


def test_the_package_has_no_import_cycle():
    """Imports anywhere in a module count (a function's import is a dependency too)."""
    deps = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(deps.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(deps):
        if module not in state:
            visit(module, [module])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    fake = {"diffusion.a": {"diffusion.b"}, "diffusion.b": {"diffusion.c"}, "diffusion.c": {"diffusion.a"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    with pytest.raises(AssertionError, match="diffusion.a -> diffusion.b -> diffusion.c -> diffusion.a"):
        test_the_package_has_no_import_cycle()


def test_the_cycle_check_finds_the_cycle_a_core_to_platform_edge_would_close(monkeypatch):
    """The edge that was allowed until the split: checkpoint -> platform.checkpoints -> ... -> checkpoint."""
    planted = {**graph(), "diffusion.checkpoint": graph()["diffusion.checkpoint"] | {"diffusion.platform.checkpoints"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: planted)
    with pytest.raises(AssertionError, match="import cycle: .*diffusion.checkpoint -> diffusion.platform.checkpoints"):
        test_the_package_has_no_import_cycle()


def long_functions() -> list[str]:
    found = []
    for root in SOURCES:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_100_lines():
    assert long_functions() == []


def test_only_the_tracking_module_imports_mlflow():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] == "mlflow" for n in names):
                importers.add(module_name(path))
    assert importers == {"diffusion.platform.tracking"}
