"""The UNet's weights in and out of the layouts the DDPM weights were published in:

- Hugging Face diffusers: a `UNet2DModel` folder (config.json + diffusion_pytorch_model.safetensors
  or .bin) or a `DDPMPipeline` folder (model_index.json, unet/, scheduler/; or all of it in one
  flat folder, as google/ddpm-cifar10-32 is laid out on the hub). The schedule, its variance and
  clipping come from the scheduler config when there is one.
- The original DDPM release (Ho et al.'s TensorFlow checkpoints) as ported to PyTorch by
  pesser/pytorch_diffusion: a state dict with `temb.dense.N`, `down.N.block.M`, separate
  `q`/`k`/`v`, `nin_shortcut`, ... in one file.

Both become checkpoint payloads (`diffusion.checkpoint`), so everything that takes a checkpoint
takes them. Import needs torch alone (safetensors files are read here); export writes a
DDPMPipeline folder through diffusers (the `[diffusers]` extra), so that diffusers itself writes
what it will read.

The three layouts hold the same tensors: ours fuses q, k and v into one 1x1 conv (`qkv`) where
the others keep three (Linear layers in diffusers, 1x1 convs in the reference); names differ,
and the up path's levels are numbered from the top in the reference, from the bottom here and in
diffusers. A class-conditional UNet is a UNet2DModel with `num_class_embeds` K + 1 (the last
row the null class of classifier-free guidance: a UNet2DModel called with class_labels K is the
unconditional model) and its class names in its config.json as `_class_names` (diffusers ignores
keys that begin with an underscore); the reference has no classes.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

from .config import Recipe
from .errors import InputError
from .schedule import make_betas
from .training import shape_fields
from .unet import UNET_CONFIGS, UNet, UNetConfig

LAYOUTS = (
    "a checkpoint.pt of this project (or its checkpoint-<step> folder, or a run folder)",
    "a diffusers UNet2DModel or DDPMPipeline folder (config.json + diffusion_pytorch_model.safetensors or .bin)",
    "a state dict of the DDPM reference as ported to PyTorch (pesser/pytorch_diffusion: temb.dense.0, down.0.block.0, ...)",
)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_EXTRA = "pip install 'ray-diffusion[diffusers]'"
PADDINGS = {(0, 1, 0, 1): 0, (1, 1, 1, 1): 1}  # ours -> diffusers' downsample_padding
VARIANCE_TYPES = {"fixed_small": "posterior", "fixed_large": "beta"}  # diffusers -> ours


class ConversionError(InputError, ValueError):
    """Weights or a config that do not map; the message names what and the layouts understood."""


def understood() -> str:
    return "understood layouts: " + "; ".join(LAYOUTS)


# ---------------------------------------------------------------------------- names


def _resnet_part(part: str, layout: str) -> str:
    names = (
        {"temb_proj": "time_emb_proj", "skip": "conv_shortcut"} if layout == "diffusers" else {"skip": "nin_shortcut"}
    )
    return names.get(part, part)


def _attention_parts(part: str, layout: str, legacy: bool = False) -> list[str]:
    if layout == "diffusers":
        qkv, proj = (["query", "key", "value"], "proj_attn") if legacy else (["to_q", "to_k", "to_v"], "to_out.0")
        return {"norm": ["group_norm"], "qkv": qkv, "proj": [proj]}[part]
    return {"norm": ["norm"], "qkv": ["q", "k", "v"], "proj": ["proj_out"]}[part]


def their_names(key: str, config: UNetConfig, layout: str, legacy: bool = False) -> list[str]:
    """The tensor(s) of `layout` ("diffusers" or "reference") that hold our tensor `key`; several
    for our fused qkv, which is theirs concatenated along the output channels (q, k, v)."""
    levels = len(config.ch_mult)
    module, _, leaf = key.rpartition(".")  # leaf: weight or bias
    diffusers = layout == "diffusers"

    def attn(prefix: str, part: str) -> list[str]:
        return [f"{prefix}.{p}.{leaf}" for p in _attention_parts(part, layout, legacy)]

    simple = {
        "temb.0": "time_embedding.linear_1" if diffusers else "temb.dense.0",
        "temb.2": "time_embedding.linear_2" if diffusers else "temb.dense.1",
        "conv_in": "conv_in",
        "norm_out": "conv_norm_out" if diffusers else "norm_out",
        "conv_out": "conv_out",
        "class_embed": "class_embedding" if diffusers else None,
    }
    if simple.get(module):
        return [f"{simple[module]}.{leaf}"]
    if m := re.fullmatch(r"(down|up)\.(\d+)\.blocks\.(\d+)\.(\w+)", module):
        path, level, block, part = m[1], int(m[2]), m[3], m[4]
        if diffusers:
            return [f"{path}_blocks.{level}.resnets.{block}.{_resnet_part(part, layout)}.{leaf}"]
        level = level if path == "down" else levels - 1 - level  # the reference numbers the up path from the top
        return [f"{path}.{level}.block.{block}.{_resnet_part(part, layout)}.{leaf}"]
    if m := re.fullmatch(r"(down|up)\.(\d+)\.attns\.(\d+)\.(\w+)", module):
        path, level, block, part = m[1], int(m[2]), m[3], m[4]
        if diffusers:
            return attn(f"{path}_blocks.{level}.attentions.{block}", part)
        level = level if path == "down" else levels - 1 - level
        return attn(f"{path}.{level}.attn.{block}", part)
    if m := re.fullmatch(r"(down|up)\.(\d+)\.resample\.conv", module):
        path, level = m[1], int(m[2])
        if diffusers:
            return [f"{path}_blocks.{level}.{'downsamplers' if path == 'down' else 'upsamplers'}.0.conv.{leaf}"]
        level = level if path == "down" else levels - 1 - level
        return [f"{path}.{level}.{'downsample' if path == 'down' else 'upsample'}.conv.{leaf}"]
    if m := re.fullmatch(r"mid\.(\d)\.(\w+)", module):
        index, part = int(m[1]), m[2]
        if index == 1:
            return attn("mid_block.attentions.0" if diffusers else "mid.attn_1", part)
        resnet = f"mid_block.resnets.{index // 2}" if diffusers else f"mid.block_{index // 2 + 1}"
        return [f"{resnet}.{_resnet_part(part, layout)}.{leaf}"]
    raise ConversionError(f"no {layout} name for our tensor {key}")


def _to_ours(tensors: dict[str, Tensor], config: UNetConfig, layout: str, origin: str) -> dict[str, Tensor]:
    """Our state dict from another layout's tensors, or a ConversionError naming every missing
    and unexpected tensor (and shape mismatch)."""
    ours = UNet(config).state_dict()
    legacy = layout == "diffusers" and any(".query." in k for k in tensors)  # diffusers' names before 0.20
    state, used, missing, wrong = {}, set(), [], []
    for key, like in ours.items():
        names = their_names(key, config, layout, legacy)
        missing += [n for n in names if n not in tensors]
        used.update(n for n in names if n in tensors)
        if any(n not in tensors for n in names):
            continue
        part_shape = torch.Size((like.shape[0] // len(names), *like.shape[1:]))
        parts = [tensors[n] for n in names]
        if any(p.numel() != part_shape.numel() for p in parts):
            wrong.append(f"{names[0]} {tuple(parts[0].shape)} (expected {tuple(part_shape)})")
            continue
        state[key] = torch.cat([p.reshape(part_shape) for p in parts]).to(like.dtype)
    missing, unexpected = sorted(missing), sorted(set(tensors) - used)
    if missing or unexpected or wrong:

        def few(names):
            return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

        problems = [f"missing {len(missing)} tensor(s): {few(missing)}"] if missing else []
        problems += [f"unexpected {len(unexpected)} tensor(s): {few(unexpected)}"] if unexpected else []
        problems += [f"wrong shape: {few(wrong)}"] if wrong else []
        raise ConversionError(
            f"{origin}: its tensors do not map onto the {layout} layout of a UNet with {config} ("
            + "; ".join(problems)
            + f"); {understood()}"
        )
    return state


def _from_ours(state: dict[str, Tensor], config: UNetConfig, layout: str, shapes: dict[str, tuple]) -> dict:
    """Another layout's tensors (shaped as in `shapes`, name -> shape) from our state dict."""
    out = {}
    for key, value in state.items():
        names = their_names(key, config, layout)
        for name, part in zip(names, value.chunk(len(names))):
            out[name] = part.reshape(shapes[name]).contiguous()
    return out


# ---------------------------------------------------------------------------- diffusers


def diffusers_unet_kwargs(config: UNetConfig) -> dict:
    """UNet2DModel arguments for the function our UNet(config) computes: for `cifar10`, the
    architecture of google/ddpm-cifar10-32 (single-head attention at 16x16, GroupNorm eps 1e-6,
    [sin, cos] embedding with exponent / (half - 1), padding right and bottom before each
    stride-2 conv). Every key that differs from diffusers' defaults is written out."""
    if config.downsample_padding not in PADDINGS:
        raise ConversionError(
            f"diffusers cannot express downsample_padding {config.downsample_padding}: it pads "
            f"(0, 1, 0, 1) or (1, 1, 1, 1) only"
        )
    sizes = [config.image_size // 2**i for i in range(len(config.ch_mult))]
    down = ["AttnDownBlock2D" if s in config.attn_resolutions else "DownBlock2D" for s in sizes]
    up = ["AttnUpBlock2D" if s in config.attn_resolutions else "UpBlock2D" for s in reversed(sizes)]
    return dict(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        block_out_channels=[config.ch * m for m in config.ch_mult],
        layers_per_block=config.num_res_blocks,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=None,  # one head over all channels (diffusers' default is 8-channel heads)
        norm_num_groups=32,
        norm_eps=1e-6,
        dropout=config.dropout,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=PADDINGS[config.downsample_padding],
        act_fn="silu",
        time_embedding_type="positional",
        mid_block_scale_factor=1,
        center_input_sample=False,
        add_attention=True,
        resnet_time_scale_shift="default",
        class_embed_type=None,
        num_class_embeds=config.num_classes + 1 if config.num_classes else None,  # the last: the null class
    )


def unet_config_from_diffusers(cfg: dict, origin: str) -> UNetConfig:
    """Our UNetConfig for a UNet2DModel config.json, or a ConversionError naming every setting
    our UNet does not compute."""
    channels = list(cfg.get("block_out_channels", []))
    required = {
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "attention_head_dim": None,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "time_embedding_type": "positional",
        "center_input_sample": False,
        "resnet_time_scale_shift": "default",
        "class_embed_type": None,
        "mid_block_scale_factor": 1,
        "add_attention": True,
        "downsample_type": "conv",
        "upsample_type": "conv",
    }
    problems = [f"{k}={cfg[k]!r} (ours: {v!r})" for k, v in required.items() if k in cfg and cfg[k] != v]
    if "attention_head_dim" not in cfg:
        problems.append("attention_head_dim absent (diffusers' default 8 splits attention into heads; ours has one)")
    if cfg.get("in_channels") != cfg.get("out_channels"):
        problems.append("in_channels != out_channels")
    class_embeds = cfg.get("num_class_embeds")
    if class_embeds is not None and (not isinstance(class_embeds, int) or class_embeds < 2):
        problems.append(f"num_class_embeds={class_embeds!r} (ours: K classes and the null class, K + 1 >= 2)")
    if cfg.get("downsample_padding", 1) not in (0, 1):
        problems.append(f"downsample_padding={cfg.get('downsample_padding')!r}")
    if not channels or any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels!r} (each a multiple of the first)")
    down, up = list(cfg.get("down_block_types", [])), list(cfg.get("up_block_types", []))
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"} or set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        problems.append(f"block types {down} / {up}")
    if problems:
        raise ConversionError(f"{origin}: a UNet2DModel this project's UNet does not compute: {'; '.join(problems)}")
    size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
    sizes = [size // 2**i for i in range(len(channels))]
    attn = tuple(s for s, kind in zip(sizes, down) if kind == "AttnDownBlock2D")
    config = UNetConfig(
        image_size=size,
        in_channels=cfg["in_channels"],
        ch=channels[0],
        ch_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=cfg["layers_per_block"],
        attn_resolutions=attn,
        dropout=float(cfg.get("dropout", 0.0)),
        downsample_padding=next(k for k, v in PADDINGS.items() if v == cfg.get("downsample_padding", 1)),
        num_classes=class_embeds - 1 if class_embeds else 0,
    )
    if diffusers_unet_kwargs(config)["up_block_types"] != up:
        raise ConversionError(f"{origin}: its up blocks {up} do not mirror its down blocks {down}")
    return config


def schedule_from_diffusers(cfg: dict | None, origin: str) -> tuple[Tensor, dict]:
    """(betas, sampling defaults) from a DDPMScheduler config; DDPM's when there is none."""
    if cfg is None:
        return make_betas("linear"), {"variance": "beta", "clip": True}  # the DDPM CIFAR-10 release
    problems = []
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        problems.append(f"prediction_type={cfg['prediction_type']!r} (ours predicts epsilon)")
    if cfg.get("thresholding"):
        problems.append("thresholding=true")
    if cfg.get("clip_sample", True) and cfg.get("clip_sample_range", 1.0) != 1.0:
        problems.append(f"clip_sample_range={cfg['clip_sample_range']!r} (ours clips to [-1, 1])")
    variance = cfg.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        problems.append(f"variance_type={variance!r} (ours: {' or '.join(VARIANCE_TYPES)})")
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    elif cfg.get("beta_schedule", "linear") == "linear":
        betas = make_betas("linear", T, cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02))
    elif cfg.get("beta_schedule") == "squaredcos_cap_v2":
        betas = make_betas("cosine", T)
    else:
        problems.append(
            f"beta_schedule={cfg.get('beta_schedule')!r} (ours: linear, squaredcos_cap_v2 or trained_betas)"
        )
        betas = None
    if problems:
        raise ConversionError(f"{origin}: a scheduler this project's samplers do not run: {'; '.join(problems)}")
    return betas, {"variance": VARIANCE_TYPES[variance], "clip": bool(cfg.get("clip_sample", True))}


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file (8-byte header length, JSON header, raw data)."""
    dtypes = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }  # fmt: skip
    data = path.read_bytes()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        body = memoryview(data)[8 + length :]
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if end > len(body):
                raise ValueError(f"{name} ends at byte {end} of a {len(body)}-byte body")
            dtype = dtypes[info["dtype"]]
            flat = (
                torch.frombuffer(bytearray(body[start:end]), dtype=dtype)
                if end > start
                else torch.empty(0, dtype=dtype)
            )
            tensors[name] = flat.reshape(info["shape"])
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file (truncated or damaged: {e})") from None
    return tensors


def _unet_folder(folder: Path) -> Path:
    for candidate in (folder / "unet", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConversionError(f"{folder} holds no config.json (nor unet/config.json); {understood()}")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def _diffusers_weights(unet_dir: Path) -> dict[str, Tensor]:
    safetensors, bin_file = (unet_dir / name for name in WEIGHT_FILES)
    if safetensors.is_file():
        return read_safetensors(safetensors)
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file; never weights_only=False
            raise ConversionError(f"{bin_file} is not a readable PyTorch state dict ({type(e).__name__})") from None
    raise ConversionError(f"{unet_dir} has a config.json but no weights: expected {' or '.join(WEIGHT_FILES)}")


def is_diffusers_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("model_index.json", "config.json", "unet/config.json"))


def payload_from_diffusers(folder: Path) -> dict:
    """A checkpoint payload from a diffusers UNet2DModel or DDPMPipeline folder (a class-conditional
    one's class names from its config's `_class_names`, else its indices)."""
    unet_dir = _unet_folder(folder)
    unet_config = _read_json(unet_dir / "config.json")
    config = unet_config_from_diffusers(unet_config, str(unet_dir / "config.json"))
    names = unet_config.get("_class_names")
    if names is not None and (not isinstance(names, list) or len(names) != config.num_classes):
        raise ConversionError(f"{unet_dir / 'config.json'}: _class_names must list its {config.num_classes} classes")
    scheduler = next(
        (p for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json") if p.is_file()),
        None,
    )
    betas, sampling = schedule_from_diffusers(_read_json(scheduler) if scheduler else None, str(scheduler))
    state = _to_ours(_diffusers_weights(unet_dir), config, "diffusers", str(unet_dir))
    payload = _payload(state, config, betas, sampling, {"layout": "diffusers", "path": str(folder)})
    return {**payload, "classes": [str(n) for n in names]} if names else payload


def _payload(state: dict, config: UNetConfig, betas: Tensor, sampling: dict, source: dict) -> dict:
    """A checkpoint payload for imported weights (EMA and raw alike: releases publish one set)."""
    kept = {"dropout": config.dropout, "num_classes": config.num_classes}
    preset = next((name for name, c in UNET_CONFIGS.items() if replace(c, **kept) == config), "custom")
    recipe = Recipe(model=preset, num_timesteps=len(betas), **kept, **shape_fields(config))
    return {
        "model": state,
        "ema": state,
        "betas": betas,
        "recipe": recipe.to_dict(),
        "unet": asdict(config),
        "step": 0,
        "sampling": sampling,
        "source": source,
    }


# ---------------------------------------------------------------------------- the DDPM reference


def is_reference_state_dict(tensors: dict) -> bool:
    return "temb.dense.0.weight" in tensors and "conv_in.weight" in tensors


def unet_config_from_reference(tensors: dict[str, Tensor], origin: str) -> UNetConfig:
    """Our UNetConfig for a reference state dict, read off its tensors' shapes. The image size is
    not in the weights: every DDPM release has attention at 16x16, so the first level with
    attention fixes it (CIFAR-10: 32; LSUN and CelebA-HQ: 256)."""
    try:
        ch, in_channels = tensors["conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("down."))
        mult = tuple(tensors[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        blocks = 1 + max(int(k.split(".")[3]) for k in tensors if k.startswith("down.0.block."))
    except (KeyError, ValueError, IndexError) as e:
        raise ConversionError(f"{origin}: not a DDPM reference UNet ({e}); {understood()}") from None
    attn_levels = sorted({int(k.split(".")[1]) for k in tensors if re.match(r"down\.\d+\.attn\.", k)})
    if not attn_levels:
        raise ConversionError(f"{origin}: no attention level to fix the image size by (DDPM puts it at 16x16)")
    size = 16 * 2 ** attn_levels[0]
    attn = tuple(size // 2**i for i in attn_levels)
    dropout = UNET_CONFIGS["cifar10"].dropout if size == 32 else 0.0  # the releases' training dropout
    return UNetConfig(size, int(in_channels), int(ch), mult, blocks, attn, dropout, (0, 1, 0, 1))


def payload_from_reference(tensors: dict[str, Tensor], origin: str) -> dict:
    """A checkpoint payload from a DDPM reference state dict: DDPM's linear schedule (T = 1000),
    its CIFAR-10 sampling settings (variance beta, "fixedlarge"; x_0 clipped to [-1, 1])."""
    config = unet_config_from_reference(tensors, origin)
    state = _to_ours(tensors, config, "reference", origin)
    sampling = {"variance": "beta", "clip": True}
    return _payload(state, config, make_betas("linear"), sampling, {"layout": "ddpm-reference", "path": origin})


# ---------------------------------------------------------------------------- export


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConversionError(f"exporting to diffusers needs Hugging Face diffusers: {DIFFUSERS_EXTRA}") from None
    return diffusers


def export_diffusers(
    model: UNet,
    betas: Tensor,
    sampling: dict,
    out: Path,
    classes: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` as a DDPMPipeline folder with a DDPMScheduler carrying `betas` and the
    sampling defaults (`variance`, `clip`), its weights in `dtype` (float16 halves the files); a
    class-conditional model's `classes` (names) go into its config. `out` must not exist or be
    an empty folder; the folder appears complete or not at all."""
    diffusers = _diffusers()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not an empty folder: give a new path")
    unet = diffusers.UNet2DModel(**diffusers_unet_kwargs(model.config))
    if model.config.num_classes:
        unet.register_to_config(_class_names=list(classes or map(str, range(model.config.num_classes))))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    unet.load_state_dict(_from_ours(model.state_dict(), model.config, "diffusers", shapes), strict=True)
    unet.to(dtype)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=len(betas),
        trained_betas=[float(b) for b in betas],
        variance_type={v: k for k, v in VARIANCE_TYPES.items()}[sampling["variance"]],
        clip_sample=sampling["clip"],
        prediction_type="epsilon",
    )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
