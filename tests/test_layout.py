"""The two layers: the core (`diffusion/`) runs with torch and numpy alone and never imports the
platform layer (`diffusion/platform/`), the package has no import cycle, MLflow is imported by
one module only, and no function is longer than 100 lines."""

import ast
import re
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
from diffusion import RECIPES, Pipeline, SamplerSettings, load_checkpoint, read_checkpoint, save_grid
from diffusion.checkpoint import save_checkpoint
from diffusion.training import build_state
config = RECIPES["tiny"]
state = build_state(config, torch.device("cpu"))
save_checkpoint(r"{tmp_path}/run/checkpoint-000000007", state, config)
model, ema_model, loaded = load_checkpoint(r"{tmp_path}/run")
sampler = Pipeline.from_checkpoint(read_checkpoint(r"{tmp_path}/run"), batch_size=2)
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
    planted = {
        **graph(),
        "diffusion.checkpoint": graph()["diffusion.checkpoint"] | {"diffusion.platform.checkpoint_uris"},
    }
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: planted)
    with pytest.raises(AssertionError, match="diffusion.checkpoint -> diffusion.platform.checkpoint_uris"):
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
    """The edge that was allowed until the split: checkpoint -> platform.checkpoint_uris -> ... -> checkpoint."""
    planted = {
        **graph(),
        "diffusion.checkpoint": graph()["diffusion.checkpoint"] | {"diffusion.platform.checkpoint_uris"},
    }
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: planted)
    with pytest.raises(
        AssertionError, match="import cycle: .*diffusion.checkpoint -> diffusion.platform.checkpoint_uris"
    ):
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


# ---------------------------------------------------------------------------- one definition per setting

COMMANDS = [PACKAGE.parent / d for d in ("jobs", "tune", "bench", "cluster", "diffusion")]
# Two options of one name that mean different things, each defined once in its own dataclass.
HOMONYMS = {
    "batch_size": "a recipe's global training batch (Recipe) vs a replica's fixed model batch (ServeArgs)",
    "name": "a training run's name (RunSettings) vs a sweep's (SweepConfig)",
}
# Hand-written flags named like a shared setting that mean something else.
NOT_THE_SETTING = {
    ("bench/quality.py", "steps"): "the grid's S values, many at once",
    ("bench/sampling.py", "steps"): "the DDIM steps of the requests it sends over HTTP",
    ("bench/scaling.py", "steps"): "training steps per measurement",
    ("bench/cpu_training.py", "steps"): "timed training steps per variant and round",
}


def option_definitions() -> dict[str, list[str]]:
    """Every option field (`name: type = option(...)` in a class body) of the package: name -> ["module:Class"]."""
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                call = item.value if isinstance(item, ast.AnnAssign) else None
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "option":
                    found.setdefault(item.target.id, []).append(f"{module_name(path)}:{node.name}")
    return found


def hand_written_flags(roots=COMMANDS, base=PACKAGE.parent) -> list[tuple[str, str]]:
    """(script, option name) of every `add_argument("--flag", ...)` written by hand in a command line."""
    found = []
    for root in roots:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                            found.append((str(path.relative_to(base)), arg.value[2:].replace("-", "_")))
    return found


def shared_settings() -> set[str]:
    """The options several commands take: each is a field of one dataclass their flags come from."""
    from dataclasses import fields

    from diffusion.config import SamplerSettings, Speed
    from diffusion.platform.settings import CheckpointOptions, Endpoint, FidWeights, Tracking

    return {
        f.name
        for cls in (CheckpointOptions, Endpoint, Tracking, FidWeights, Speed, SamplerSettings)
        for f in fields(cls)
    }


def test_every_setting_is_defined_once():
    twice = {name: where for name, where in option_definitions().items() if len(where) > 1 and name not in HOMONYMS}
    assert twice == {}, f"settings defined more than once (make one dataclass that both inherit): {twice}"


def test_no_command_writes_a_shared_settings_flag_by_hand():
    shared = shared_settings()
    by_hand = sorted((s, n) for s, n in hand_written_flags() if n in shared and (s, n) not in NOT_THE_SETTING)
    assert by_hand == [], f"flags written by hand for shared settings (use cli.add_options): {by_hand}"


def test_the_setting_checks_find_a_planted_second_definition(tmp_path, monkeypatch):
    """A hand-written --which in a script and a second `which` option field both fail."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "planted.py").write_text('p.add_argument("--which", default="latest")\n')
    planted_flags = [*hand_written_flags(), *hand_written_flags([tmp_path / "jobs"], tmp_path)]
    monkeypatch.setattr(sys.modules[__name__], "hand_written_flags", lambda: planted_flags)
    with pytest.raises(AssertionError, match=r"\('jobs/planted.py', 'which'\)"):
        test_no_command_writes_a_shared_settings_flag_by_hand()
    planted = {**option_definitions(), "which": ["diffusion.platform.settings:CheckpointOptions", "bench.quality:Args"]}
    monkeypatch.setattr(sys.modules[__name__], "option_definitions", lambda: planted)
    with pytest.raises(AssertionError, match="'which'"):
        test_every_setting_is_defined_once()


def test_the_sweeps_search_flags_are_the_searchable_options():
    from diffusion.platform.settings import SEARCHABLE
    from helpers import run_main

    help_text = run_main("tune/sweep.py", "--help").stdout
    flags = set(re.findall(r"--search-([a-z-]+)", help_text)) - {"seed"}  # --search-seed: the search's own seed
    assert flags == {name.replace("_", "-") for name in SEARCHABLE}


def test_ci_runs_the_readmes_test_command():
    """.ci/run ends in README's test command, verbatim: what CI runs is what README promises."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme[readme.index("# Tests (what CI runs") :]
    command = block.splitlines()[1]
    assert command.startswith("python3 -m venv") and "pytest" in command
    assert (PACKAGE.parent / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command
