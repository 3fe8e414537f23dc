"""jobs/generate.py and the core benchmark, run as a user runs them."""

import json

from PIL import Image

from helpers import cli


def test_generate_writes_a_sample_grid(tmp_path):
    out = tmp_path / "grid.png"
    for sampler, n, side in [("ddim", 4, 2 * 32 + 3 * 2), ("ddpm", 1, 32)]:  # DDPM runs all 1000 steps
        proc = cli(
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
    proc = cli("jobs/generate.py", "--n", "0")
    assert proc.returncode == 2 and "--n must be >= 1, got 0" in proc.stderr
    proc = cli("jobs/generate.py", "--config", "imagenet")
    assert proc.returncode == 2 and "invalid choice: 'imagenet'" in proc.stderr
    proc = cli("jobs/generate.py", "--steps", "0", "--n", "1")
    assert proc.returncode != 0 and "steps must be in [1, 1000]" in proc.stderr


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench/core.py", "--smoke", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {row["task"] for row in data["results"]} == {"forward", "train_step", "ddim2"}
    assert all(row["img_per_s"] > 0 and row["gflop_per_img_forward"] > 0.5 for row in data["results"])
    assert data["meta"]["torch"]
