"""jobs/generate.py and the core benchmark, run as a user runs them."""

import json

import pytest
from PIL import Image

from helpers import cli, tiny_checkpoint


@pytest.mark.slow
def test_generate_samples_a_checkpoint_with_either_sampler(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100)
    out = tmp_path / "grid.png"
    for sampler, n, side in [("ddim", 4, 2 * 32 + 3 * 2), ("ddpm", 1, 32)]:  # DDPM runs all T = 100 steps
        proc = cli(
            "jobs/generate.py", "--checkpoint", checkpoint, "--sampler", sampler, "--steps", 5, "--n", n, "--out", out
        )
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out}: {n} images, {sampler}" in proc.stdout and "on cpu" in proc.stdout
        with Image.open(out) as img:
            assert img.size == (side, side)


def test_generate_rejects_bad_arguments(tmp_path):
    proc = cli("jobs/generate.py", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "the following arguments are required: --checkpoint" in proc.stderr
    proc = cli("jobs/generate.py", "--checkpoint", "c", "--n", "0")
    assert proc.returncode == 2 and "--n and --batch-size must be >= 1" in proc.stderr
    proc = cli("jobs/generate.py", "--checkpoint", "c", "--figure-seeds", "3")
    assert proc.returncode == 2 and "--figure-seeds must be an even number" in proc.stderr
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100)
    proc = cli("jobs/generate.py", "--checkpoint", checkpoint, "--steps", "101", "--out", tmp_path / "x.png")
    assert proc.returncode == 1 and "steps must be in [1, 100]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench/core.py", "--smoke", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {row["task"] for row in data["results"]} == {"forward", "train_step", "ddim2"}
    assert all(row["img_per_s"] > 0 and row["gflop_per_img_forward"] > 0.5 for row in data["results"])
    assert data["meta"]["torch"]
