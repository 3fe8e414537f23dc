"""jobs/generate.py and the core benchmark, run as a user runs them."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, assert_machine_recorded, cli, cli_env, run_main, tiny_checkpoint


@pytest.mark.slow
def test_generate_samples_a_checkpoint_with_either_sampler(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100)
    out = tmp_path / "grid.png"
    for sampler, n, side in [("ddim", 4, 2 * 32 + 3 * 2), ("ddpm", 1, 32)]:  # DDPM runs all T = 100 steps
        args = ["--checkpoint", checkpoint, "--sampler", sampler, "--steps", 5, "--n", n, "--batch-size", n]
        proc = cli("jobs/generate.py", *args, "--out", out)
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out}: {n} images, {sampler}" in proc.stdout and "on cpu" in proc.stdout
        with Image.open(out) as img:
            assert img.size == (side, side)


def test_generate_rejects_bad_arguments(tmp_path):
    proc = run_main("jobs/generate.py", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "the following arguments are required: --checkpoint" in proc.stderr
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--n", "0")
    assert proc.returncode == 2 and "--n and --batch-size must be >= 1" in proc.stderr
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--figure-seeds", "3")
    assert proc.returncode == 2 and "--figure-seeds must be an even number" in proc.stderr
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100)
    proc = run_main("jobs/generate.py", "--checkpoint", checkpoint, "--steps", "101", "--out", tmp_path / "x.png")
    assert proc.returncode == 1 and "steps must be in [1, 100]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_main("bench/core.py", "--smoke", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {row["task"] for row in data["results"]} == {"forward", "train_step", "ddim2"}
    assert all(row["img_per_s"] > 0 and row["gflop_per_img_forward"] > 0.5 for row in data["results"])
    assert data["meta"]["torch"]
    assert_machine_recorded(data["meta"]["machine"])


def gpu_sh(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/gpu.sh", *args], cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_gpu_script_runs_its_steps_at_smoke_size(tmp_path):
    """bench/gpu.sh is run once per GPU lease with no second chance: its CPU smoke mode keeps it
    working. What comes back is two files: the log and one archive of the results."""
    proc = gpu_sh("--smoke", OUT=str(tmp_path), PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-results.tar.gz", "gpu.log"]
    assert "smoke run done" in (tmp_path / "gpu.log").read_text()
    with tarfile.open(tmp_path / "gpu-results.tar.gz") as tar:
        files = {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert set(files) == {"device.txt", "preflight.json", "speed-smoke.json", "speed-smoke.md"}, set(files)
    assert b"torch" in files["device.txt"]
    preflight = json.loads(files["preflight.json"])
    assert all(preflight[check]["ok"] for check in ("train", "graphs", "round_trip")), preflight
    assert preflight["train"]["fused_adam"] is False and preflight["graphs"]["max_abs_diff"] == 0.0  # CPU: eager both
    rows = json.loads(files["speed-smoke.json"])["rows"]
    assert {row["task"] for row in rows} == {"train", "ddim2", "ddpm10"} and all(row["ratio"] > 0 for row in rows)


def test_the_gpu_script_prints_its_usage_and_refuses_unknown_arguments(tmp_path):
    """--help must not start a full run (nor install anything): it prints the usage and exits."""
    usage = gpu_sh("--help", OUT=str(tmp_path))
    assert usage.returncode == 0 and "bash bench/gpu.sh --smoke" in usage.stdout and "preflight" in usage.stdout
    assert not any(tmp_path.iterdir())
    for args in (["--smok"], ["--smoke", "--extra"]):
        refused = gpu_sh(*args, OUT=str(tmp_path))
        assert refused.returncode == 2 and "bench/gpu.sh:" in refused.stderr, refused.stderr
    assert not any(tmp_path.iterdir())
