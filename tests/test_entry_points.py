"""The README's main command and the benchmark, run as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_generate_writes_a_sample_grid(tmp_path):
    out = tmp_path / "grid.png"
    for sampler, n, side in [("ddim", 4, 2 * 32 + 3 * 2), ("ddpm", 1, 32)]:  # DDPM runs all 1000 steps
        proc = run(
            "jobs/generate.py",
            "--config",
            "tiny",
            "--sampler",
            sampler,
            "--steps",
            "5",
            "--n",
            str(n),
            "--out",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr
        assert "randomly initialised tiny UNet" in proc.stdout
        with Image.open(out) as img:
            assert img.size == (side, side)


def test_generate_rejects_bad_arguments():
    proc = run("jobs/generate.py", "--n", "0")
    assert proc.returncode == 2 and "--n must be >= 1, got 0" in proc.stderr
    proc = run("jobs/generate.py", "--config", "imagenet")
    assert proc.returncode == 2 and "invalid choice: 'imagenet'" in proc.stderr
    proc = run("jobs/generate.py", "--steps", "0", "--n", "1")
    assert proc.returncode != 0 and "steps must be in [1, 1000]" in proc.stderr


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench/core.py", "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {row["task"] for row in data["results"]} == {"forward", "train_step", "ddim2"}
    assert all(row["img_per_s"] > 0 and row["gflop_per_img_forward"] > 0.5 for row in data["results"])
    assert data["meta"]["torch"]


def test_core_imports_only_torch_and_numpy():
    code = (
        "import sys, diffusion, diffusion.schedule, diffusion.unet, diffusion.samplers, diffusion.interpolate; "
        "heavy = [m for m in ('ray', 'mlflow', 'boto3', 'pyarrow', 'torchvision') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
