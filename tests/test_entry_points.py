"""jobs/generate.py and the core benchmark, run as a user runs them."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT, assert_machine_recorded, cli, cli_env, cli_popen, run_main, tiny_checkpoint


@pytest.mark.slow
def test_generate_writes_a_png_per_seed_with_each_sampler_counting_model_calls(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100)
    runs = [("ddim", "3-5,9", 2 * 5), ("ddpm", "7", 100), ("dpmpp_2m", "3-5,9", 2 * 5)]  # DDPM: all T = 100 steps
    for sampler, seeds, calls in runs:
        out = tmp_path / sampler
        steps = [] if sampler == "ddpm" else ["--steps", 5]
        args = ["--checkpoint", checkpoint, "--sampler", sampler, *steps, "--seeds", seeds, "--batch-size", 2]
        proc = cli("jobs/generate.py", *args, "--out", out)
        assert proc.returncode == 0, proc.stderr
        assert f"{calls}/{calls}" in proc.stderr  # the progress bar counts model calls (batches x steps)
        assert f"to {out}: {sampler}" in proc.stdout and "on cpu" in proc.stdout
        assert f"model batch {1 if sampler == 'ddpm' else 2}," in proc.stdout  # one seed: no padding to 2
        names = sorted(p.name for p in out.glob("0*.png"))
        assert names == [f"{s:010d}.png" for s in ([7] if sampler == "ddpm" else [3, 4, 5, 9])]
        with Image.open(out / names[0]) as image:
            assert image.size == (32, 32)
        with Image.open(out / "samples.png") as grid:
            assert grid.size == ((32, 32) if sampler == "ddpm" else (2 * 32 + 3 * 2,) * 2)  # one image: no border


@pytest.mark.slow
def test_figures_cost_what_they_print_and_each_is_written_when_done(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100, preset="digits")  # 8x8 grey: cheap calls
    out = tmp_path / "out"
    args = ["--checkpoint", checkpoint, "--seeds", 0, "--steps", 2, "--out", out, "--figures", "--figure-seeds", 2]
    proc = cli_popen("jobs/generate.py", *args)
    lines, written = [], []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"wrote {out / 'figures'}"):
            name = Path(line.split()[1].rstrip(":")).stem
            assert (out / "figures" / f"{name}.png").is_file()
            written.append((name, sorted(p.stem for p in (out / "figures").glob("*.png"))))
    assert proc.wait(timeout=600) == 0, "".join(lines[-20:])
    text = "".join(lines)
    # S = 10, 20, 50, 100 (180 calls); one pair by DDIM-50; DDPM interpolation from t = 10 between
    # two DDIM-50 samples; the sequence by DDIM-50 with eta 1.
    estimate = "figures: 340 model calls on batches of 9 (ddim_consistency 180, ddim_interpolation 50, "
    assert estimate + "ddpm_interpolation 60, ddpm_sequence 50), about" in text
    assert "340/340" in text and "341/" not in text  # the calls counted, one by one: as estimated
    assert "--full-figures: the papers' S=1000, t up to T/2 and a DDPM chain, 130 calls more" not in text  # T = 100
    names = ["ddim_consistency", "ddim_interpolation", "ddpm_interpolation", "ddpm_sequence"]
    # Each figure was on disk when its line was printed, and the later ones were not yet.
    assert written == [(name, sorted(names[: i + 1])) for i, name in enumerate(names)]
    with Image.open(out / "figures" / "ddpm_interpolation.png") as figure:  # the two sources beside 9 lambdas
        assert figure.size[0] > 11 * 72


def test_generate_rejects_bad_arguments(tmp_path):
    proc = run_main("jobs/generate.py", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "the following arguments are required: --checkpoint" in proc.stderr
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--n", "0")
    assert proc.returncode == 2 and "--n must be >= 1" in proc.stderr
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--seeds", "5-2")
    assert proc.returncode == 2 and "'5-2' is not a seed or a range FIRST-LAST" in proc.stderr
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--seeds", "0-3", "--n", "4")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--sampler", "ddpm", "--steps", "20")
    assert (
        proc.returncode == 2
        and "steps is for DDIM" in proc.stderr
        and "sampler ddim with eta 1 and steps 20" in proc.stderr
    )
    proc = run_main("jobs/generate.py", "--checkpoint", "c", "--figure-seeds", "3")
    assert proc.returncode == 2 and "--figure-seeds must be an even number" in proc.stderr
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100)
    proc = run_main("jobs/generate.py", "--checkpoint", checkpoint, "--steps", "101", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "steps must be in [1, 100]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_generate_draws_each_class_asked_from_every_seed_into_a_folder_per_class(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", num_timesteps=100, conditional=True)  # cat, dog, ship
    out = tmp_path / "classes"
    args = ["--checkpoint", checkpoint, "--steps", 3, "--seeds", "4-5", "--classes", "ship,0", "--guidance", 3]
    proc = run_main("jobs/generate.py", *args, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 4 PNGs (2 classes, a folder each) and samples.png to {out}: ddim-3-cfg3" in proc.stdout
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*.png")) == [
        "cat/0000000004.png",
        "cat/0000000005.png",
        "ship/0000000004.png",
        "ship/0000000005.png",
    ]
    with Image.open(out / "samples.png") as grid:  # a row per class, a column per seed
        assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    # Without --classes, each seed draws class seed mod 3.
    proc = run_main(
        "jobs/generate.py", "--checkpoint", checkpoint, "--steps", 2, "--seeds", "0-2", "--out", out / "each"
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(out / "each")) for p in (out / "each").glob("*/*.png")) == [
        "cat/0000000000.png",
        "dog/0000000001.png",
        "ship/0000000002.png",
    ]


def test_classes_and_guidance_a_checkpoint_cannot_honour_are_one_line_with_exit_code_2(tmp_path):
    conditional = tiny_checkpoint(tmp_path / "conditional", num_timesteps=100, conditional=True)
    unconditional = tiny_checkpoint(tmp_path / "unconditional", num_timesteps=100)
    for checkpoint, args, message in (
        (conditional, ["--classes", "horse"], "no class 'horse': the model's 3 classes are 0 cat, 1 dog, 2 ship"),
        (conditional, ["--classes", "1-3"], "no class '1-3': the model's 3 classes are"),
        (unconditional, ["--classes", "cat"], "this checkpoint is unconditional (trained without classes)"),
        (unconditional, ["--guidance", 3], "guidance_scale 3 needs a class-conditional model"),
        (conditional, ["--guidance", -1], "guidance_scale must be >= 0, got -1.0"),
        (conditional, ["--classes", "cat,"], "has an empty item"),
    ):
        out = tmp_path / "out"
        proc = run_main("jobs/generate.py", "--checkpoint", checkpoint, "--steps", 2, *args, "--out", out)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists(), proc.stderr


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
    assert preflight["train"]["fused_adam"] is True and preflight["graphs"]["max_abs_diff"] == 0.0  # CPU: eager both
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
