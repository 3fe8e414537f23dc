"""The UNet of Ho et al. (2020), appendix B: a PixelCNN++-style UNet with a sinusoidal
time embedding, two residual blocks per resolution, self-attention at chosen
resolutions, and skip connections from every down block to the up path.

It predicts the noise eps_theta(x_t, t) for x_t of shape (B, C, H, W) and 0-based
integer timesteps t of shape (B,). With `num_classes` K > 0 it is class-conditional,
eps_theta(x_t, t, y) for labels y of shape (B,) in [0, K]: a learned embedding of y is added to
the time embedding (as diffusers' UNet2DModel with `num_class_embeds`), and y = K is the null
class, the unconditional model of classifier-free guidance (Ho & Salimans 2022,
`diffusion.guidance`), which label dropout trains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channels = ch * mult at each resolution
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1
    # Zero padding (left, right, top, bottom) before each stride-2 downsampling conv: the DDPM
    # reference pads right and bottom only, (0, 1, 0, 1); (1, 1, 1, 1) is a conv with padding 1,
    # what checkpoints written before this field existed were trained with.
    downsample_padding: tuple[int, int, int, int] = (0, 1, 0, 1)
    num_classes: int = 0  # 0: unconditional; K: a class embedding of K + 1 rows, the last the null class

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        object.__setattr__(self, "downsample_padding", tuple(self.downsample_padding))
        if len(self.downsample_padding) != 4 or any(p not in (0, 1) for p in self.downsample_padding):
            raise ValueError(f"downsample_padding must be 4 values of 0 or 1, got {self.downsample_padding}")
        if self.ch % 32:
            raise ValueError(f"ch must be a multiple of 32 for GroupNorm(32), got {self.ch}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        lowest = self.image_size // 2 ** (len(self.ch_mult) - 1)
        if lowest * 2 ** (len(self.ch_mult) - 1) != self.image_size:
            raise ValueError(
                f"image_size {self.image_size} cannot be halved {len(self.ch_mult) - 1} times "
                f"for ch_mult {self.ch_mult}"
            )
        sizes = [self.image_size // 2**i for i in range(len(self.ch_mult))]
        missing = [r for r in self.attn_resolutions if r not in sizes]
        if missing:
            raise ValueError(f"attn_resolutions {missing} do not occur; the resolutions are {sizes}")

    def to_dict(self) -> dict:
        return asdict(self)


UNET_CONFIGS: dict[str, UNetConfig] = {
    # DDPM's CIFAR-10 model: 35.7M parameters, the reference's function (its released weights load).
    "cifar10": UNetConfig(),
    # STL-10 at 96x96 (not in the paper): the CIFAR-10 network with the same depth
    # (96 -> 48 -> 24 -> 12) and attention at 24, the second-lowest resolution, as 16 is
    # for CIFAR-10 (the middle block adds attention at 12). Same 35.7M parameters;
    # about 9x the FLOPs of the CIFAR-10 model, as it has 9x the pixels.
    "stl10": UNetConfig(image_size=96, attn_resolutions=(24,)),
    # CIFAR-10 on a 2-core CPU in about 2 hours (the cifar10-cpu preset): the paper's network at
    # base width 64 with three levels (32 -> 16 -> 8), attention at 16; 6.5M parameters, 3.4x the
    # bf16 training throughput of the paper's 35.7M on such a CPU (bench/cpu_training.py).
    "cifar10-cpu": UNetConfig(ch=64, ch_mult=(1, 2, 2), dropout=0.0),
    # DDPM's CelebA-HQ and LSUN 256x256 models (google/ddpm-church-256 and its kin): six levels
    # (256 -> 8), widths 128-512, attention at 16; 114M parameters.
    "ddpm-256": UNetConfig(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    # A small model for CPU tests and demos.
    "tiny": UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0),
    # The 8x8 grey digits (jobs/prepare_data.py --dataset digits), trained on a CPU: 8 -> 4 -> 2
    # (three levels: a fourth would be 1x1), attention at 4x4 (16 positions, as at CIFAR-10's
    # 16x16 the second-lowest level) and in the middle block at 2x2; ch 32 (1.6M parameters).
    "digits": UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(4,)),
}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer positional encoding), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class RowwiseLinear(nn.Linear):
    """A Linear that, in eval mode, computes one small matmul per batch item, so that a sample's
    output does not depend on the batch size or its position in the batch (a (B, K) x (K, N)
    GEMM picks kernels and tail handling by B). Training has no such guarantee to keep and takes
    the one GEMM. Used for the tiny time-embedding layers only."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        b = x.shape[0]
        return torch.baddbmm(self.bias.expand(b, 1, -1), x[:, None, :], self.weight.t().expand(b, -1, -1)).squeeze(1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = RowwiseLinear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection. q, k, v and
    the output projection are the reference's 1x1 convolutions, applied to the (B, HW, C) tokens
    as the linear maps they are: one GEMM each, and q, k, v with their channels contiguous, which
    SDPA's fused kernels (flash on CPU and CUDA) need; strided inputs fall back to its math kernel."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.view(b, 1, h * w, 3, c).unbind(3)  # (B, 1 head, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """A stride-2 3x3 conv after zero padding `padding` (left, right, top, bottom)."""

    def __init__(self, ch: int, padding: tuple[int, int, int, int]):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual (+ attention) blocks of one resolution, followed by a resampler."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, temb_ch, dropout = config.ch, 4 * config.ch, config.dropout
        self.temb = nn.Sequential(RowwiseLinear(ch, temb_ch), nn.SiLU(), RowwiseLinear(temb_ch, temb_ch))
        self.class_embed = nn.Embedding(config.num_classes + 1, temb_ch) if config.num_classes else None
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def attn(channels: int, resolution: int) -> nn.Module:
            return AttnBlock(channels) if resolution in config.attn_resolutions else nn.Identity()

        # Down path: record the channel count of every activation that becomes a skip.
        skip_chs, in_ch, resolution = [ch], ch, config.image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(config.ch_mult):
            out_ch, blocks, attns = ch * mult, [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, temb_ch, dropout))
                attns.append(attn(out_ch, resolution))
                in_ch = out_ch
                skip_chs.append(in_ch)
            last = i == len(config.ch_mult) - 1
            resample = nn.Identity() if last else Downsample(in_ch, config.downsample_padding)
            self.down.append(Level(blocks, attns, resample))
            if not last:
                skip_chs.append(in_ch)
                resolution //= 2

        self.mid = nn.ModuleList(
            [ResBlock(in_ch, in_ch, temb_ch, dropout), AttnBlock(in_ch), ResBlock(in_ch, in_ch, temb_ch, dropout)]
        )

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(config.ch_mult))):
            out_ch, blocks, attns = ch * mult, [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(in_ch + skip_chs.pop(), out_ch, temb_ch, dropout))
                attns.append(attn(out_ch, resolution))
                in_ch = out_ch
            self.up.append(Level(blocks, attns, Upsample(in_ch) if i > 0 else nn.Identity()))
            if i > 0:
                resolution *= 2

        self.norm_out = _norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, config.in_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self):
        # As the reference: Xavier-uniform ("fan_avg" variance scaling) everywhere, and
        # zeros for the last layer of every residual branch and of the network.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        last_layers = [self.conv_out]
        last_layers += [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        last_layers += [m.proj for m in self.modules() if isinstance(m, AttnBlock)]
        for m in last_layers:
            nn.init.zeros_(m.weight)
        if self.class_embed is not None:  # the conditional network starts as the unconditional one
            nn.init.zeros_(self.class_embed.weight)

    @property
    def null_class(self) -> int:
        """The label of the unconditional model (the class embedding's last row)."""
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.temb(timestep_embedding(t, self.config.ch).to(x.dtype))  # float64 networks too
        if self.class_embed is not None:
            y = torch.full_like(t, self.null_class) if y is None else y
            temb = temb + self.class_embed(y).to(temb.dtype)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes 0): it takes no class labels")
        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if not isinstance(level.resample, nn.Identity):
                hs.append(level.resample(hs[-1]))
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def shaped(
    base: UNetConfig,
    image_size: int = 0,
    in_channels: int = 0,
    ch: int = 0,
    ch_mult: tuple[int, ...] | None = None,
    num_res_blocks: int = 0,
    attn_resolutions: tuple[int, ...] | None = None,
    **fields,
) -> UNetConfig:
    """`base` with the shape given (0 or None: base's) and any other `fields`. At another image size,
    base's attention stays at its levels (16 of 32 is 32 of 64) unless `attn_resolutions` is given.
    ValueError where the shape is impossible (the size cannot be halved as often as ch_mult asks)."""
    size = image_size or base.image_size
    if attn_resolutions is None:
        attn_resolutions = tuple(size // (base.image_size // r) for r in base.attn_resolutions)
    given = {"in_channels": in_channels, "ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks}
    changes = {"image_size": size, **{key: value for key, value in given.items() if value}}
    return UNetConfig(**{**base.to_dict(), **changes, "attn_resolutions": attn_resolutions, **fields})


def build_unet(name_or_config: str | UNetConfig | dict = "cifar10", **overrides) -> UNet:
    """The UNet for a named config ("cifar10", "stl10", "tiny"), a UNetConfig or a dict of its fields."""
    if isinstance(name_or_config, str):
        if name_or_config not in UNET_CONFIGS:
            raise ValueError(f"unknown UNet config {name_or_config!r}: choose one of {', '.join(UNET_CONFIGS)}")
        config = UNET_CONFIGS[name_or_config]
    elif isinstance(name_or_config, dict):
        unknown = set(name_or_config) - {f.name for f in fields(UNetConfig)}
        if unknown:
            raise ValueError(f"unknown UNet config fields {sorted(unknown)}")
        config = UNetConfig(**name_or_config)
    else:
        config = name_or_config
    if overrides:
        config = UNetConfig(**{**config.to_dict(), **overrides})
    return UNet(config)
