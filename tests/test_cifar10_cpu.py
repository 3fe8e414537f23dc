"""CIFAR-10 on a CPU and its judge. The judge kept in the package (diffusion/judges/, made by
bench/cifar10_judge.py): what its record says, that it ranks real images above blurred ones above
noise, and that jobs/evaluate.py judges CIFAR-10 with it where no Inception weights are at hand.
The cifar10-cpu preset trains; the GPU quality run (bench/gpu.sh --quality) runs at smoke size."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.classifier import CIFAR10_JUDGE, Scorer, accuracy, cifar10_judge
from helpers import cifar_subset_folder, cli, run_main, tiny_checkpoint

pytestmark = pytest.mark.timeout(900)


def test_the_kept_judge_is_what_its_record_says():
    record = json.loads(CIFAR10_JUDGE.with_suffix(".json").read_text())
    assert hashlib.sha256(CIFAR10_JUDGE.read_bytes()).hexdigest() == record["weights_sha256"]
    assert record["test_accuracy"] >= 0.85 and record["train_images"] == 50_000 and record["test_images"] == 10_000
    assert record["machine"]["cpu"] and record["training_seconds"] > 0
    net = cifar10_judge()  # loads with weights_only=True
    assert sum(p.numel() for p in net.parameters()) == 272_474


def blurred(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) images through a 5x5 box blur."""
    x = images.permute(0, 3, 1, 2).float()
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def test_the_judge_ranks_real_images_above_blurred_above_noise(cifar):
    train, _ = cifar("train", 100)
    test, labels = cifar("test", 50)
    as_hwc = lambda x: x.permute(0, 2, 3, 1).contiguous()  # noqa: E731
    train, test = as_hwc(train), as_hwc(test)
    net = cifar10_judge()
    assert accuracy(net, test, labels) >= 0.8  # 500 test images (JPEG, as it was trained on)
    scorer = Scorer(net, train.numpy(), test.numpy())
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real, blur, rand = (scorer(x.numpy()) for x in (test, blurred(test), noise))
    assert real["fd"] < blur["fd"] < rand["fd"], (real["fd"], blur["fd"], rand["fd"])
    assert real["confident"] > 3 * max(blur["confident"], rand["confident"]), (real, blur, rand)  # 0.72, 0.08, 0.17
    # Noise is not "less confident" (a classifier is overconfident far from its data): it is
    # all one class, which the class shares show where the confident share cannot.
    assert all(0.05 <= share <= 0.15 for share in real["class_shares"])  # 50 of each class, mostly right
    assert max(rand["class_shares"]) > 0.9 and sum(real["class_shares"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_evaluate_judges_cifar10_with_the_kept_judge_where_no_inception_weights_are_at_hand(
    cifar_shards, tmp_path, ray_address, mlflow_uri
):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    args = ["--checkpoint", checkpoint, "--data", cifar_shards, "--n", 20, "--steps", 3, "--batch-size", 10]
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "RAY_ADDRESS": ray_address, "TORCH_HOME": tmp_path / "no-hub-cache"}
    proc = cli("jobs/evaluate.py", *args, **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no FID Inception weights here: CIFAR-10 is judged by the kept ResNet-20" in proc.stdout
    results = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    assert results["metric"] == "fd_cifar10" and results["fd_cifar10"] > results["fd_cifar10_floor"] > 0
    shares = [results[f"class_share.{name}"] for name in ("airplane", "cat", "truck")]
    assert all(0 <= s <= 1 for s in shares) and results["class_share_min"] <= min(shares)
    assert results["classifier_weights_sha256"] == hashlib.sha256(CIFAR10_JUDGE.read_bytes()).hexdigest()
    assert "FD-CIFAR10" in proc.stdout and "class shares" in proc.stdout


def test_a_data_set_without_its_own_judge_is_refused_by_the_quality_bench(tmp_path):
    from diffusion.platform.shards import write_shards
    from diffusion.platform.sources import Source
    from diffusion.platform.storage import open_location

    images = np.zeros((4, 16, 16, 3), np.uint8)
    source = Source("imagefolder", ["train"], ["a", "b"], iter([("train", images, np.array([0, 1, 0, 1]))]))
    write_shards(source, open_location(str(tmp_path / "shards")), quiet=True)
    proc = run_main(
        "bench/quality.py", "--checkpoint", tiny_checkpoint(tmp_path / "ckpt"), "--data", tmp_path / "shards"
    )
    assert proc.returncode != 0 and "no classifier judges it" in proc.stderr


def test_the_cpu_preset_validates_and_trains(monkeypatch):
    """The cifar10-cpu preset: its recipe and settings check, and its UNet (6.5M) trains a few
    steps of the core loop in the precision `auto` picks for CPU training here, each batch in the
    model's memory format (a channels_last batch into a contiguous CPU model: 15-25% slower)."""
    from diffusion.platform.settings import PRESETS
    from diffusion.speed import use_bf16
    from diffusion.training import DeviceData, build_state, train_loop

    job = PRESETS["cifar10-cpu"]
    job.validate()
    recipe = job.recipe.replace(batch_size=4, warmup_steps=1)
    state = build_state(recipe, torch.device("cpu"), channels_last=False)
    assert 6.4e6 < sum(p.numel() for p in state.model.parameters()) < 6.6e6
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    losses, contiguous = [], []
    state.model.register_forward_pre_hook(lambda _, args: contiguous.append(args[0].is_contiguous()))
    bf16 = use_bf16("auto", torch.device("cpu"), training=True)
    train_loop(
        state,
        recipe,
        lambda: DeviceData(images).epoch(4),
        3,
        bf16=bf16,
        after_step=lambda loss, _: losses.append(loss.item()),
    )
    assert state.step == 3 and all(np.isfinite(losses)) and contiguous == [True] * 3


@pytest.mark.slow
def test_the_gpu_quality_run_runs_its_steps_at_smoke_size(tmp_path, cifar):
    """bench/gpu_quality.py (bench/gpu.sh --quality) is run once per GPU lease: its CPU smoke keeps
    it working. Each step's result is in results.json as it is made, and the grid is written."""
    cifar("test", 1)  # skips where the shared CIFAR-10 copy is absent
    source = cifar_subset_folder(tmp_path / "images", {"train": 8, "test": 4})
    out = tmp_path / "out"
    proc = run_main("bench/gpu_quality.py", "--smoke", "--source", source, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == "judged" and results["steps"] >= 3 and results["train_images"] == 64
    assert results["ema"]["fd"] > 0 and len(results["ema"]["class_shares"]) == 10 and results["untrained"]["fd"] > 0
    assert (out / "grid.png").is_file() and results["floor_n"] == 32


def test_the_judge_script_trains_resumes_and_records(tmp_path, cifar):
    """bench/cifar10_judge.py at smoke size (one epoch of 80 images): the weights, loadable with
    weights_only=True, and their record; run again with the same arguments, it resumes after its
    last epoch instead of training again."""
    cifar("test", 1)  # skips where the shared CIFAR-10 copy is absent
    source = cifar_subset_folder(tmp_path / "images", {"train": 8, "test": 2})
    out = tmp_path / "judge.pt"
    args = ["--source", source, "--epochs", 1, "--batch-size", 16, "--out", out, "--work", tmp_path / "work"]
    first = run_main("bench/cifar10_judge.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["train_images"], record["test_images"]) == (80, 20) and 0 <= record["test_accuracy"] <= 1
    assert record["weights_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and record["machine"]["cpu"]
    assert "epoch 1/1" in first.stdout and not list(tmp_path.glob("*.partial"))
    cifar10_judge(out)
    again = run_main("bench/cifar10_judge.py", *args)
    assert again.returncode == 0 and "resumed from" in again.stdout and "epoch 1/1" not in again.stdout


def test_the_cpu_training_bench_compares_every_choice(tmp_path):
    """bench/cpu_training.py --smoke: every variant timed, fp32 contiguous on every core the ratio's base."""
    proc = run_main("bench/cpu_training.py", "--smoke", "--json", tmp_path / "cpu.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cpu.json").read_text())["results"]
    assert len(rows) == 6 and rows[0]["ratio"] == 1.0 and all(row["img_per_s"] > 0 for row in rows)
    assert {(r["precision"], r["memory_format"]) for r in rows} == {
        (p, m) for p in ("fp32", "bf16") for m in ("contiguous", "channels_last")
    }
