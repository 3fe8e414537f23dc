"""The two layers: the core (`diffusion/`) runs with torch and numpy alone, reaches the
platform layer (`diffusion/platform/`) at exactly one place, and the package has no import
cycle; MLflow is imported by one module only."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion"
BLOCKED = ("ray", "mlflow", "fastapi", "pyarrow", "boto3", "pydantic", "diffusers")
# The core's one door into the platform: a checkpoint URI that is not a local path.
CORE_TO_PLATFORM = {("diffusion.checkpoint", "diffusion.platform.checkpoints")}


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
from diffusion import PRESETS, Sampler, SamplerSettings, load_checkpoint, read_checkpoint, save_grid
from diffusion.checkpoint import save_checkpoint
from diffusion.training import build_state
config = PRESETS["tiny"]
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


def test_the_core_reaches_the_platform_only_through_the_checkpoint_uri_dispatch():
    edges = {(a, b) for a, targets in graph().items() for b in targets}
    core_to_platform = {
        (a, b) for a, b in edges if not a.startswith("diffusion.platform") and b.startswith("diffusion.platform")
    }
    assert core_to_platform == CORE_TO_PLATFORM


def test_the_package_has_no_import_cycle():
    """Imports anywhere in a module count (a function's import is a dependency too), but for
    the core's one lazy door into the platform."""
    deps = {a: targets - {b for a2, b in CORE_TO_PLATFORM if a2 == a} for a, targets in graph().items()}
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
    try:
        test_the_package_has_no_import_cycle()
    except AssertionError as e:
        assert "diffusion.a -> diffusion.b -> diffusion.c -> diffusion.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_only_the_tracking_module_imports_mlflow():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] == "mlflow" for n in names):
                importers.add(module_name(path))
    assert importers == {"diffusion.platform.tracking"}
