"""A user's own image folder, end to end at smoke size, as README's commands run it: 64x64 images
of two classes (a grey one, an RGBA one and a note among them) prepared, trained from scratch,
exported, fine-tuned, sampled and served, every output's size checked; one MLflow run
per training run."""

import json
import signal
from dataclasses import asdict

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from diffusion.checkpoint import model_from, unet_config_of
from diffusion.platform.checkpoint_uris import read_checkpoint
from diffusion.platform.net import wait_for_http
from diffusion.platform.settings import EXPERIMENT
from helpers import cli, cli_popen, free_port, npz, post

pytestmark = pytest.mark.timeout(900)
SIZE = 64
OPTIONS = ["--preset", "tiny", "--num-workers", "1", "--batch-size", "4", "--log-every", "2", "--eval-every", "2"]
OPTIONS += ["--checkpoint-every", "2", "--sample-every", "100", "--sample-n", "2", "--sample-steps", "2"]
OPTIONS += ["--heldout-size", "8", "--precision", "fp32"]


def image_folder(root, per_class: int = 10):
    """Two classes of 64x64 pictures: dark discs and light squares on noise; one image of each
    class saved grey and RGBA, and a text file beside them."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for name in ("discs", "squares"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            cx, cy, r = rng.integers(16, 48, 2).tolist() + [int(rng.integers(6, 14))]
            inside = (
                (xx - cx) ** 2 + (yy - cy) ** 2 < r**2 if name == "discs" else (abs(xx - cx) < r) & (abs(yy - cy) < r)
            )
            pixels[inside] = 30 if name == "discs" else 225
            image = Image.fromarray(pixels)
            image = {0: image.convert("L"), 1: image.convert("RGBA")}.get(i, image) if name == "squares" else image
            image.save(root / name / f"{i}.png")
    (root / "squares" / "notes.txt").write_text("where these came from")
    return root


def train(data, storage, name, max_steps, mlflow_uri, ray_address, *extra):
    return cli(
        "jobs/train.py",
        *OPTIONS,
        *["--data", data, "--storage", storage, "--name", name, "--max-steps", max_steps, *extra],
        MLFLOW_TRACKING_URI=mlflow_uri,
        RAY_ADDRESS=ray_address,
    )


def heldout_loss_of(model, data) -> float:
    """A model's L_simple on the held-out set a run of OPTIONS on `data` evaluates (its first 8
    training images, as the data has no test split), in fp32."""
    from diffusion.images import from_uint8
    from diffusion.platform.ray_train import heldout_images
    from diffusion.platform.settings import PRESETS
    from diffusion.platform.shards import ShardSet
    from diffusion.schedule import NoiseSchedule, make_betas
    from diffusion.training import HeldoutSet

    job = PRESETS["tiny"].replace(heldout_size=8)
    heldout, _, _ = heldout_images(ShardSet.open(str(data)), job.settings)
    images = from_uint8(torch.from_numpy(heldout["image"]).permute(0, 3, 1, 2))
    recipe = job.recipe
    schedule = NoiseSchedule(make_betas(recipe.schedule, recipe.num_timesteps, recipe.beta_start, recipe.beta_end))
    return HeldoutSet(images, recipe.num_timesteps, recipe.seed).loss(model.eval(), schedule)


def runs_named(mlflow_uri, name):
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'", order_by=["start_time"])
    return client, runs


@pytest.mark.slow
def test_an_image_folder_of_64x64_images_end_to_end(tmp_path, ray_address, mlflow_uri, cifar_shards):
    data, runs, tuned = tmp_path / "data", tmp_path / "runs", tmp_path / "tuned"
    prepared = cli(
        "jobs/prepare_data.py", "--dataset", "imagefolder", "--source", image_folder(tmp_path / "mine"), "--out", data
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "skipped 1 file(s) that are not images" in prepared.stdout and "squares/notes.txt" in prepared.stdout
    assert "converted to RGB: 1 grey (L), 1 RGBA (RGBA)" in prepared.stdout, prepared.stdout
    manifest = json.loads((data / "manifest.json").read_text())
    assert (manifest["height"], manifest["width"], manifest["channels"], manifest["classes"]) == (
        64,
        64,
        3,
        ["discs", "squares"],
    )

    # From scratch: no shape option given, a 64x64 UNet (the tiny preset's attention at the same level).
    proc = train(data, runs, "mine", 4, mlflow_uri, ray_address)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = read_checkpoint(runs / "mine")
    unet = unet_config_of(payload)
    assert (unet.image_size, unet.in_channels, unet.attn_resolutions) == (64, 3, (32,))
    assert payload["recipe"]["image_size"] == 64 and payload["recipe"]["ch_mult"] == "1,2"

    # Exported to diffusers, then fine-tuned from that folder: a new run, its own MLflow run.
    exported = tmp_path / "exported"
    proc = cli("jobs/export.py", "--checkpoint", runs / "mine", "--out", exported)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((exported / "unet" / "config.json").read_text())["sample_size"] == 64
    proc = train(data, tuned, "mine", 2, mlflow_uri, ray_address, "--init-from", exported, "--lr", "1e-4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    source = read_checkpoint(exported)

    # Another data set is refused before Ray starts (a resume's MLflow run: tests/test_train.py).
    proc = train(cifar_shards, runs, "mine", 8, mlflow_uri, ray_address)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{runs}/mine trains on another data set ({data}), not {cifar_shards} of 32x32x3 images" in proc.stderr
    assert "give another --name or --storage for a new run" in proc.stderr

    client, (first, second) = runs_named(mlflow_uri, "mine")
    loss_steps = [[m.step for m in client.get_metric_history(r.info.run_id, "loss")] for r in (first, second)]
    assert loss_steps == [[2, 4], [2]]
    assert first.data.params["storage"] == str(runs) and second.data.params["storage"] == str(tuned)
    assert second.data.params["init_from"] == str(exported) and len(second.data.tags["init_from_sha256"]) == 64
    assert json.loads((tuned / "mine" / "run.json").read_text())["mlflow_run_id"] == second.info.run_id

    # The fine-tune's first held-out loss is the exported model's own on the same held-out set.
    tuned_payload = read_checkpoint(tuned / "mine")
    assert unet_config_of(tuned_payload).image_size == 64 and tuned_payload["step"] == 2
    heldout = [m for m in client.get_metric_history(second.info.run_id, "heldout_loss") if m.step == 0]
    heldout_ema = [m for m in client.get_metric_history(second.info.run_id, "heldout_loss_ema") if m.step == 0]
    assert heldout[0].value == pytest.approx(heldout_ema[0].value, rel=1e-6)  # both the source's weights
    assert heldout[0].value == pytest.approx(heldout_loss_of(model_from(source), data), rel=1e-5)

    # Sampled and served at 64x64.
    proc = cli(
        "jobs/generate.py", "--checkpoint", tuned / "mine", "--seeds", "0-1", "--steps", "2", "--out", tmp_path / "s"
    )
    assert proc.returncode == 0, proc.stderr
    assert [Image.open(tmp_path / "s" / f"{i:010d}.png").size for i in (0, 1)] == [(64, 64)] * 2
    port = free_port()
    # Its own Ray: Serve's proxy would stay on the session's, at this port, after the app is deleted.
    server = cli_popen(
        "jobs/serve.py", "--checkpoint", tuned / "mine", "--port", port, "--batch-size", 2, RAY_ADDRESS="local"
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", 180, server, any_status=False)
        status, _, body = post(f"http://127.0.0.1:{port}/v1/samples", {"n": 2, "seed": 0, "steps": 2, "format": "npz"})
        assert status == 200 and npz(body).shape == (2, 64, 64, 3)
        output = ""
        while "try: " not in output:  # from its request to try on, a stop is a clean shutdown
            line = server.stdout.readline()
            assert line, output
            output += line
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0


# ---------------------------------------------------------------------------- quick: the rules, one by one


def test_every_preset_at_its_own_size_is_its_named_unet_and_others_keep_its_levels():
    from diffusion.config import RECIPES, Recipe
    from diffusion.training import recipe_unet, shaped_to_data
    from diffusion.unet import UNET_CONFIGS

    for name, unet in UNET_CONFIGS.items():
        recipe = RECIPES.get(name, Recipe(model=name, dropout=unet.dropout))
        shaped = shaped_to_data(recipe, unet.image_size, unet.image_size, unet.in_channels)
        assert (
            recipe_unet(shaped)
            == recipe_unet(recipe)
            == unet.__class__(**{**unet.to_dict(), "dropout": recipe.dropout})
        )
    at_64 = recipe_unet(shaped_to_data(RECIPES["cifar10"], 64, 64, 1))
    assert (at_64.image_size, at_64.in_channels, at_64.ch_mult, at_64.attn_resolutions) == (64, 1, (1, 2, 2, 2), (32,))
    custom = RECIPES["tiny"].replace(ch=64, ch_mult="1,2,2", num_res_blocks=2, attn_resolutions="none")
    shaped = recipe_unet(shaped_to_data(custom, 48, 48, 3))
    assert (shaped.ch, shaped.ch_mult, shaped.num_res_blocks, shaped.attn_resolutions) == (64, (1, 2, 2), 2, ())


@pytest.mark.parametrize(
    "changes, data, message",
    [
        (
            {},
            (48, 64, 3),
            "the data's images are 64x48: the UNet takes square ones; prepare them with jobs/prepare_data.py --size N",
        ),
        ({}, (36, 36, 3), "the cifar10 UNet cannot take 36x36 images: image_size 36 cannot be halved 3 times"),
        ({"image_size": 32}, (64, 64, 3), "image_size 32 does not match the data's 64: drop --image-size"),
        ({"in_channels": 3}, (32, 32, 1), "in_channels 3 does not match the data's 1: drop --in-channels"),
        (
            {"ch_mult": "1,x"},
            (32, 32, 3),
            "ch_mult must be positive integers separated by commas (e.g. 1,2,2,2), got '1,x'",
        ),
        (
            {"attn_resolutions": "12"},
            (32, 32, 3),
            "attn_resolutions [12] do not occur; the resolutions are [32, 16, 8, 4]",
        ),
    ],
)
def test_a_network_that_cannot_meet_the_data_is_one_line_naming_the_fix(changes, data, message):
    from diffusion.config import RECIPES
    from diffusion.errors import OptionError
    from diffusion.training import shaped_to_data

    with pytest.raises(OptionError) as error:
        shaped_to_data(RECIPES["cifar10"].replace(**changes), *data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_ddpm_256_is_the_published_lsun_and_celebahq_shape():
    from diffusion.convert import diffusers_unet_kwargs
    from diffusion.unet import UNET_CONFIGS, build_unet

    kwargs = diffusers_unet_kwargs(UNET_CONFIGS["ddpm-256"])  # google/ddpm-church-256's config.json
    assert kwargs["block_out_channels"] == [128, 128, 256, 256, 512, 512] and kwargs["layers_per_block"] == 2
    assert kwargs["down_block_types"] == ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"]
    diffusers = pytest.importorskip("diffusers")
    count = sum(p.numel() for p in build_unet("ddpm-256").parameters())
    assert count == sum(p.numel() for p in diffusers.UNet2DModel(**kwargs).parameters()) and 113e6 < count < 114e6


def test_a_resume_is_refused_with_another_data_set_network_or_schedule(tmp_path):
    from diffusion.config import RECIPES
    from diffusion.errors import OptionError
    from diffusion.platform.run_folder import RunRecord, as_json
    from diffusion.platform.storage import open_location
    from diffusion.training import recipe_unet, shaped_to_data

    folder = open_location(str(tmp_path / "run"))
    recipe = shaped_to_data(RECIPES["tiny"], 32, 32, 3)
    unet = recipe_unet(recipe).to_dict()
    record = RunRecord("abc", "data/mine", "1" * 64, recipe.to_dict(), unet)
    record.write(folder)
    assert RunRecord.of_resumed(folder) is None  # a record without a checkpoint: a new run
    (tmp_path / "run" / "checkpoint-000000010").mkdir()
    (tmp_path / "run" / "checkpoint-000000010" / "checkpoint.pt").write_bytes(b"")
    assert RunRecord.of_resumed(folder) == RunRecord(**as_json(asdict(record)))  # as JSON holds it
    where = folder.uri

    record.check_resume(recipe.replace(max_steps=10**6, lr=1e-4, dropout=0.2), unet, "moved/mine", "1" * 64, where)
    wider = shaped_to_data(RECIPES["tiny"].replace(ch=64), 32, 32, 3)
    cases = [
        ((recipe, unet, "data/other", "2" * 64), f"{where} trains on another data set (data/mine), not data/other"),
        (
            (wider, recipe_unet(wider).to_dict(), "data/mine", "1" * 64),
            "network or noise schedule (ch 32 there, 64 asked)",
        ),
        ((recipe.replace(schedule="cosine"), unet, "data/mine", "1" * 64), "(schedule 'linear' there, 'cosine' asked)"),
    ]
    at_64 = shaped_to_data(RECIPES["tiny"], 64, 64, 3)
    cases.append(
        (
            (at_64, recipe_unet(at_64).to_dict(), "data/mine-64", "3" * 64),
            "not data/mine-64 of 64x64x3 images, the run's 32x32x3 (jobs/prepare_data.py --size 32)",
        )
    )
    for args, message in cases:
        with pytest.raises(OptionError) as error:
            record.check_resume(*args, where)
        assert message in str(error.value), str(error.value)
        assert str(error.value).endswith(
            f"give another --name or --storage for a new run, or {where}'s own to resume it"
        )


def test_init_from_weights_that_cannot_start_the_run_is_one_line(tmp_path):
    from diffusion.errors import OptionError
    from diffusion.platform.ray_train import InitialWeights
    from diffusion.platform.settings import PRESETS
    from helpers import tiny_checkpoint

    source = tiny_checkpoint(tmp_path / "tiny")
    job = PRESETS["tiny"].replace(init_from=source)
    manifest = {"height": 32, "width": 32, "channels": 3}
    start = InitialWeights.read(job.replace(num_classes=2, dropout=0.1), manifest)
    assert (start.unet.num_classes, start.unet.dropout, start.recipe.ch_mult, start.recipe.num_classes) == (
        2,
        0.1,
        "1,2",
        2,
    )
    cases = [
        (job, {**manifest, "height": 64, "width": 64}, "takes 32x32 images of 3 channel(s), the data's are 64x64 of 3"),
        (job.replace(ch=64), manifest, "has its own network shape: drop --ch 64"),
    ]
    for bad_job, bad_manifest, message in cases:
        with pytest.raises(OptionError) as error:
            InitialWeights.read(bad_job, bad_manifest)
        assert message in str(error.value)
    conditional = tiny_checkpoint(tmp_path / "classes", conditional=True)
    with pytest.raises(OptionError, match="is a UNet of 3 classes: give --num-classes 3"):
        InitialWeights.read(job.replace(init_from=conditional), manifest)
