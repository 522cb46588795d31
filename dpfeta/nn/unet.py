"""DDPM++/NCSN++-style U-Net (the DPDM/DP-FETA backbone), built for Opacus hooks mode.

Layout as in score_sde's ``NCSNpp`` with ``resblock_type='biggan'``, ``progressive='none'``,
no FIR, ``skip_rescale=True``, ``init_scale=0``: BigGAN residual blocks that up/downsample
inside the block, GroupNorm with ``min(C // 4, 32)`` groups, SiLU, DDPM attention, a sinusoidal
noise embedding plus a class embedding (one extra row = the null class for classifier-free
guidance) followed by a two-layer MLP.

Every parameter lives in an ``nn.Conv2d``, ``nn.Linear``, ``nn.GroupNorm`` or ``nn.Embedding``,
and each module is called once per forward, so Opacus' hooks compute every per-sample gradient
without a functorch fallback. The attention projections are ``nn.Linear`` over channel-last tokens
(the same parameters as score_sde's 1x1 ``NIN`` layers, with an efficient per-sample rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpfeta.config import Config, ModelConfig

_SKIP_SCALE = 1.0 / math.sqrt(2.0)


def _init(layer: nn.Linear | nn.Conv2d, scale: float = 1.0) -> nn.Module:
    """score_sde ``default_init``: variance scaling (fan_avg, uniform); scale 0 gives zeros."""
    if scale == 0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer


def _conv3x3(in_ch: int, out_ch: int, scale: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(in_ch, out_ch, 3, padding=1), scale)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def noise_embedding(c_noise: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the (continuous) noise input ``c_noise`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_positions) / (half - 1) * torch.arange(half, dtype=torch.float32, device=c_noise.device)
    )
    angles = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """BigGAN-type residual block; ``up``/``down`` resample both branches (nearest / 2x2 mean)."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_ch: int, *, up: bool = False, down: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        self.up, self.down = up, down
        self.norm0 = _norm(in_ch)
        self.conv0 = _conv3x3(in_ch, out_ch)
        self.emb = _init(nn.Linear(emb_ch, out_ch))
        self.norm1 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv3x3(out_ch, out_ch, scale=0.0)
        self.skip = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch or up or down else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * _SKIP_SCALE


class AttnBlock(nn.Module):
    """DDPM self-attention over all positions, one head, projections as ``nn.Linear``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (_init(nn.Linear(channels, channels)) for _ in range(3))
        self.out = _init(nn.Linear(channels, channels), scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = F.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
        h = self.out(h).transpose(1, 2).reshape(batch, channels, height, width)
        return (x + h) * _SKIP_SCALE


class UNet(nn.Module):
    """F(x, c_noise, y) of the EDM parametrisation; ``class_labels == num_classes`` is the null class."""

    def __init__(self, *, resolution: int, in_channels: int, num_classes: int, model: ModelConfig):
        super().__init__()
        levels = len(model.channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(
                f"expected resolution={resolution} divisible by 2**{levels - 1} for channel_mult={model.channel_mult}"
            )
        if num_classes < 1:
            raise ValueError(f"expected num_classes >= 1, got {num_classes}")
        self.resolution, self.in_channels, self.num_classes = resolution, in_channels, num_classes
        nf, emb_ch = model.channels, model.emb_channels
        block = dict(emb_ch=emb_ch, dropout=model.dropout)
        attn_at = set(model.attn_resolutions)

        # Noise and class embedding.
        self.class_embed = nn.Embedding(num_classes + 1, nf)
        self.map0 = _init(nn.Linear(nf, emb_ch))
        self.map1 = _init(nn.Linear(emb_ch, emb_ch))

        # Encoder: per level num_res_blocks blocks (+attention), then a downsampling block.
        self.conv_in = _conv3x3(in_channels, nf)
        self.enc = nn.ModuleList()
        skips, ch = [nf], nf
        for level, mult in enumerate(model.channel_mult):
            res = resolution >> level
            for _ in range(model.num_res_blocks):
                self.enc.append(ResBlock(ch, nf * mult, **block))
                ch = nf * mult
                if res in attn_at:
                    self.enc.append(AttnBlock(ch))
                skips.append(ch)
            if level < levels - 1:
                self.enc.append(ResBlock(ch, ch, down=True, **block))
                skips.append(ch)

        # Middle: ResBlock, attention, ResBlock.
        self.mid = nn.ModuleList([ResBlock(ch, ch, **block), AttnBlock(ch), ResBlock(ch, ch, **block)])

        # Decoder: per level num_res_blocks + 1 blocks on concatenated skips (+attention), then up.
        self.dec = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(model.num_res_blocks + 1):
                self.dec.append(ResBlock(ch + skips.pop(), nf * model.channel_mult[level], **block))
                ch = nf * model.channel_mult[level]
            if resolution >> level in attn_at:
                self.dec.append(AttnBlock(ch))
            if level > 0:
                self.dec.append(ResBlock(ch, ch, up=True, **block))
        assert not skips

        self.norm_out = _norm(ch)
        self.conv_out = _conv3x3(ch, in_channels, scale=0.0)

    @classmethod
    def from_config(cls, cfg: Config) -> "UNet":
        return cls(
            resolution=cfg.data.resolution,
            in_channels=cfg.data.channels,
            num_classes=cfg.data.num_classes,
            model=cfg.model,
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        emb = noise_embedding(c_noise, self.class_embed.embedding_dim) + self.class_embed(class_labels)
        emb = self.map1(F.silu(self.map0(emb)))

        hs = [self.conv_in(x)]
        for layer in self.enc:
            if isinstance(layer, AttnBlock):
                hs[-1] = layer(hs[-1])
            else:
                hs.append(layer(hs[-1], emb))

        h = hs[-1]
        for layer in self.mid:
            h = layer(h) if isinstance(layer, AttnBlock) else layer(h, emb)

        for layer in self.dec:
            if isinstance(layer, AttnBlock):
                h = layer(h)
            elif layer.up:
                h = layer(h, emb)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
