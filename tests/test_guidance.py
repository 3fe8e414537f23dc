"""Class-conditional sampling with classifier-free guidance (diffusion/guidance.py), exact in
every sampler: s = 1 is the conditional model and s = 0 the null class, bit for bit; the
conditional and null halves come from one model call; a guidance interval guides only there;
a seed's image does not depend on which classes share its batch. Then the class vocabulary
(diffusion/classes.py), the class embedding of the UNet, label dropout and the EMA's warm-up."""

from dataclasses import replace

import pytest
import torch

from diffusion import classes
from diffusion.checkpoint import recipe_of
from diffusion.config import RECIPES, SamplerSettings
from diffusion.ema import EMA, warmup_decay
from diffusion.errors import OptionError
from diffusion.guidance import classifier_free_guidance
from diffusion.pipeline import Pipeline
from diffusion.samplers import ddim_sample, ddpm_sample, dpm_solver_sample
from diffusion.schedule import make_betas
from diffusion.training import training_labels
from diffusion.unet import build_unet

T = 100  # a short chain keeps DDPM's every-step sampler cheap


def conditional_unet(num_classes=3, seed=0):
    """A tiny class-conditional UNet with every zero-initialised layer (the class embedding too) perturbed."""
    torch.manual_seed(seed)
    model = build_unet("tiny", num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(conditional_unet(), make_betas("linear", T), batch_size=4, classes=("cat", "dog", "ship"))


class Counting:
    """A conditional model that records the labels of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, y):
        self.calls.append(y.tolist())
        return self.model(x, t, y)


def test_guidance_is_the_null_prediction_plus_s_times_the_difference_in_one_call():
    model = Counting(conditional_unet())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([40, 40]), torch.tensor([0, 2])
    with torch.no_grad():
        eps = classifier_free_guidance(model, y, 3, scale=2.5)(x, t)
        conditional, null = model.model(x, t, y), model.model(x, t, torch.tensor([3, 3]))
    assert model.calls == [[0, 2, 3, 3]]  # the conditional and the null halves in one batched call
    torch.testing.assert_close(eps, null + 2.5 * (conditional - null), rtol=0, atol=1e-6)
    model.calls.clear()
    with torch.no_grad():
        assert torch.equal(classifier_free_guidance(model, y, 3, scale=1)(x, t), conditional)  # one call, its classes
        assert torch.equal(classifier_free_guidance(model, y, 3, scale=0)(x, t), null)  # one call, the null class
    assert model.calls == [[0, 2], [3, 3]]
    model.calls.clear()
    with torch.no_grad():  # outside the interval [0, 30]: the conditional model alone
        assert torch.equal(classifier_free_guidance(model, y, 3, 2.5, t_max=30)(x, t), conditional)
    assert model.calls == [[0, 2]]
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        classifier_free_guidance(model, y, 3, scale=-1)


SAMPLERS = {
    "ddim": SamplerSettings("ddim", 10),
    "ddim-eta1": SamplerSettings("ddim", 10, eta=1.0),
    "ddpm": SamplerSettings("ddpm"),
    "dpmpp_2m": SamplerSettings("dpmpp_2m", 10),
}


def plain(pipeline, settings, seeds, labels):
    """Sampling `pipeline`'s model given `labels` with the core sampler itself: no guidance at all."""
    s = pipeline.settings(settings)
    x_T, generators = pipeline.noise(seeds)
    y = torch.tensor(labels)

    def net(x, t):
        return pipeline.net(x, t, y)

    if s.sampler == "ddim":
        return ddim_sample(net, pipeline.betas, x_T, steps=s.steps, eta=s.eta, generator=generators)
    if s.sampler == "dpmpp_2m":
        return dpm_solver_sample(net, pipeline.betas, x_T, steps=s.steps)
    return ddpm_sample(net, pipeline.betas, x_T, generator=generators)


@pytest.mark.parametrize("name", SAMPLERS)
def test_scale_1_is_conditional_sampling_and_scale_0_the_null_class_exactly_in_every_sampler(pipeline, name):
    settings, seeds, labels = SAMPLERS[name], [3, 4, 5], [0, 1, 2]
    conditional = plain(pipeline, settings, seeds, labels)
    assert torch.equal(pipeline.samples(seeds, settings, classes=labels), conditional)
    null = plain(pipeline, settings, seeds, [3, 3, 3])
    assert torch.equal(pipeline.samples(seeds, replace(settings, guidance_scale=0.0), classes=labels), null)
    assert torch.equal(pipeline.samples(seeds, settings), null)  # no class asked: the null class
    guided = pipeline.samples(seeds, replace(settings, guidance_scale=3.0), classes=labels)
    assert not torch.equal(guided, conditional) and not torch.equal(guided, null)


def test_a_seeds_image_does_not_depend_on_its_batch_or_the_classes_beside_it(pipeline):
    settings = SamplerSettings("ddim", 10, eta=1.0, guidance_scale=3.0)  # stochastic: its noise is the seed's too
    alone = pipeline.samples([7], settings, classes=[1])
    for seeds, labels in (([7, 8, 9], [1, 0, 2]), ([2, 7, 8, 9, 10], [2, 1, 2, 2, 0]), ([9, 7], [1, 1])):
        batch = pipeline.samples(seeds, settings, classes=labels)
        assert torch.equal(batch[seeds.index(7)], alone[0]), (seeds, labels)


def test_a_guidance_interval_guides_only_the_steps_inside_it(pipeline):
    base, seeds, labels = SamplerSettings("ddim", 10), [1, 2], [2, 0]  # tau 0, 10, ..., 90
    conditional = pipeline.samples(seeds, base, classes=labels)
    guided = pipeline.samples(seeds, replace(base, guidance_scale=3.0), classes=labels)
    within = {
        (91, 99): conditional,  # no step of tau inside: the conditional model throughout
        (0, 99): guided,  # every step inside: guided throughout
    }
    for (low, high), expected in within.items():
        interval = replace(base, guidance_scale=3.0, guidance_min_t=low, guidance_max_t=high)
        assert torch.equal(pipeline.samples(seeds, interval, classes=labels), expected), (low, high)
    partly = pipeline.samples(
        seeds, replace(base, guidance_scale=3.0, guidance_min_t=30, guidance_max_t=60), classes=labels
    )
    assert not torch.equal(partly, conditional) and not torch.equal(partly, guided)
    assert replace(base, guidance_scale=3.0, guidance_min_t=30, guidance_max_t=60).label(T) == "ddim-10-cfg3-t30-60"
    with pytest.raises(OptionError, match="guidance_min_t 60 is above guidance_max_t 30"):
        SamplerSettings(guidance_min_t=60, guidance_max_t=30)
    with pytest.raises(OptionError, match="guidance_max_t must be a 0-based timestep below the model's T = 100"):
        pipeline.settings(SamplerSettings(guidance_scale=2.0, guidance_max_t=100))


def test_interpolations_and_sequences_are_guided_as_samples_are(pipeline):
    settings = SamplerSettings("ddim", 10, guidance_scale=3.0)
    sample = pipeline.samples([4], settings, classes=[2])
    # DDIM interpolation: lambda 0 is seed a's own x_T, decoded as its sample is.
    interpolation = pipeline.ddim_interpolation(4, 5, [0.0, 0.5, 1.0], settings, label=2)
    assert torch.equal(interpolation[0], sample[0])
    assert not torch.equal(interpolation, pipeline.ddim_interpolation(4, 5, [0.0, 0.5, 1.0], settings, label=0))
    # A diffusion sequence: its last prediction of x_0 is the sample.
    _, _, pred_x0 = pipeline.sequences([4], settings, record=[0], classes=[2])
    assert torch.equal(pred_x0[0], sample[0])
    # DDPM interpolation: guided, and the same at s = 1 as given the class alone.
    a, b = torch.zeros(3, 32, 32), torch.ones(3, 32, 32) * 0.5
    ddpm = SamplerSettings("ddpm")
    plain_ddpm = pipeline.ddpm_interpolation(a, b, 20, [0.5], seed=1, label=1, settings=ddpm)
    assert not torch.equal(
        plain_ddpm, pipeline.ddpm_interpolation(a, b, 20, [0.5], 1, 1, replace(ddpm, guidance_scale=3.0))
    )
    assert not torch.equal(plain_ddpm, pipeline.ddpm_interpolation(a, b, 20, [0.5], seed=1, label=0, settings=ddpm))


def test_classes_are_asked_for_by_name_index_or_range_and_anything_else_is_named():
    names = ["airplane", "automobile", "bird", "cat"]
    assert classes.resolve("0-2", names) == [0, 1, 2]
    assert classes.resolve("cat,airplane,1", names) == [3, 0, 1]
    assert classes.resolve(["bird", 3], names) == [2, 3]
    for spec, match in (
        ("horse", r"no class 'horse': the model's 4 classes are 0 airplane, 1 automobile, 2 bird, 3 cat"),
        ("2-7", r"no class '2-7'"),
        ("cat,,dog", "has an empty item"),
    ):
        with pytest.raises(OptionError, match=match):
            classes.resolve(spec, names)
    with pytest.raises(OptionError, match="this checkpoint is unconditional"):
        classes.resolve("cat", [])
    # Each class from every seed; none asked: class seed mod K.
    assert classes.images([0, 1], [3, 1], 4) == ([0, 1, 0, 1], [3, 3, 1, 1])
    assert classes.images([5, 6, 7], None, 4) == ([5, 6, 7], [1, 2, 3])
    assert classes.images([5, 6], None, 0) == ([5, 6], None)
    assert classes.rows([0, 1, 2, 0, 1, 2, 0, 1]) == [
        [0, 3],
        [1, 4],
        [2, 5],
    ]  # a row per class, as long as the shortest


def test_a_pipeline_refuses_classes_and_guidance_it_cannot_honour(pipeline):
    unconditional = Pipeline(build_unet("tiny").eval(), make_betas("linear", T), batch_size=2)
    with pytest.raises(OptionError, match="this checkpoint is unconditional"):
        unconditional.samples([0], SamplerSettings("ddim", 2), classes=[0])
    with pytest.raises(OptionError, match="guidance_scale 3 needs a class-conditional model"):
        unconditional.samples([0], SamplerSettings("ddim", 2, guidance_scale=3.0))
    with pytest.raises(OptionError, match=r"no class \[3\]: the model's 3 classes are 0 cat, 1 dog, 2 ship"):
        pipeline.samples([0], SamplerSettings("ddim", 2), classes=[3])  # 3 is the null class: never asked for


def test_the_class_embedding_starts_at_zero_and_an_unconditional_unet_takes_no_labels():
    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=4).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        outputs = [model(x, t, torch.tensor([c, c])) for c in range(5)]
    assert all(torch.equal(out, outputs[0]) for out in outputs)  # at initialisation: the unconditional network
    assert model.class_embed.weight.shape == (5, 128) and model.null_class == 4
    with pytest.raises(ValueError, match="this UNet is unconditional"):
        build_unet("tiny")(x, t, torch.tensor([0, 1]))


def test_label_dropout_trains_the_null_class_and_images_without_a_label_are_it():
    recipe = RECIPES["tiny"].replace(num_classes=10, class_dropout=0.25)
    torch.manual_seed(0)
    labels = training_labels(torch.arange(10).repeat(1000), recipe)
    assert abs((labels == 10).double().mean().item() - 0.25) < 0.02
    kept = labels != 10
    assert torch.equal(labels[kept], torch.arange(10).repeat(1000)[kept])
    assert (training_labels(torch.full((50,), -1), recipe) == 10).all()  # STL-10's unlabeled split


def test_the_ema_warms_up_as_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    theirs = EMAModel(torch.nn.Linear(2, 2).parameters(), decay=0.999)
    for update in range(0, 20000, 37):
        assert warmup_decay(0.999, update) == pytest.approx(theirs.get_decay(update + 1), abs=1e-15), update
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # the first update: decay 0, the EMA is the weights
    assert ema.ema_model.weight.item() == 1.0
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model, step=1)  # decay 2/11
    assert ema.ema_model.weight.item() == pytest.approx(2 / 11)
    # A checkpoint's recipe from before the warm-up existed trained without it.
    assert recipe_of({"recipe": {"model": "tiny"}}).ema_warmup is False
    assert recipe_of({"recipe": RECIPES["tiny"].to_dict()}).ema_warmup is True
