"""Connectors: map vision-encoder patch features [B, N, Dv] into LLM embeddings [B, T, Dt].

A connector is named by a spec string, validated by `parse_connector` when the config is made:
  mlp{D}x[_act]                              LLaVA's MLP with D layers, e.g. `mlp2x_gelu`
  pixelshuffle{F}_mlp[{D}x][_act]            pixel shuffle by F (F*F fewer tokens), then a D-layer MLP (D=2)
  perceiver_{L}x{D}[_h{H}][_kv{K}][_act]     L learned latents, D cross-attention blocks, H heads, K kv heads
The activation is any name in transformers' ACT2FN (default gelu).
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

_SPEC = re.compile(
    r"(?P<kind>mlp)(?P<depth>\d+)x"
    r"|(?P<shuffle>pixelshuffle)(?P<factor>\d+)_mlp(?:(?P<shuffle_depth>\d+)x)?"
    r"|(?P<perceiver>perceiver)_(?P<latents>\d+)x(?P<blocks>\d+)(?:_h(?P<heads>\d+))?(?:_kv(?P<kv_heads>\d+))?"
)
EXAMPLES = "mlp2x_gelu, pixelshuffle2_mlp, perceiver_64x2, perceiver_64x2_h8_kv2"


@dataclass(frozen=True)
class ConnectorSpec:
    kind: str  # "mlp" | "pixelshuffle" | "perceiver"
    act: str = "gelu"
    mlp_depth: int = 2
    shuffle_factor: int = 1
    latents: int = 0
    blocks: int = 0
    heads: int | None = None  # perceiver only; None: text hidden size // 64 (at least 1)
    kv_heads: int | None = None  # perceiver only; None: same as heads

    def num_tokens(self, num_patches: int) -> int:
        """Image tokens the connector emits for an image encoded as `num_patches` feature vectors."""
        if self.kind == "perceiver":
            return self.latents
        return num_patches // (self.shuffle_factor**2)

    def perceiver_heads(self, text_hidden: int) -> tuple[int, int]:
        heads = self.heads or max(1, text_hidden // 64)
        return heads, self.kv_heads or heads


def parse_connector(spec: str) -> ConnectorSpec:
    match = _SPEC.match(spec)
    rest = spec[match.end() :] if match else None
    if match is None or (rest and not rest.startswith("_")):
        raise ValueError(f"Unknown connector spec {spec!r}: use one of the forms {EXAMPLES}.")
    act = rest[1:] or "gelu"
    if act not in ACT2FN:
        raise ValueError(f"Connector spec {spec!r} names activation {act!r}, which is not in transformers' ACT2FN (try gelu or silu).")
    numbers = {k: int(v) for k, v in match.groupdict().items() if v and v.isdigit()}
    if any(v < 1 for v in numbers.values()):
        raise ValueError(f"Connector spec {spec!r} has a zero count: every number in it must be at least 1.")
    if match["kind"]:
        return ConnectorSpec("mlp", act, mlp_depth=numbers["depth"])
    if match["shuffle"]:
        return ConnectorSpec("pixelshuffle", act, mlp_depth=numbers.get("shuffle_depth", 2), shuffle_factor=numbers["factor"])
    return ConnectorSpec(
        "perceiver",
        act,
        latents=numbers["latents"],
        blocks=numbers["blocks"],
        heads=numbers.get("heads"),
        kv_heads=numbers.get("kv_heads"),
    )


def mlp(in_dim: int, out_dim: int, depth: int, act: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [ACT2FN[act], nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class MLPConnector(nn.Module):
    """LLaVA-1.5's projector: one token per patch."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, text_dim: int):
        super().__init__()
        self.mlp = mlp(vision_dim, text_dim, spec.mlp_depth, spec.act)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, G*G, D] -> [B, (G/f)^2, D*f*f]: each f x f block of neighbouring patches becomes one token."""
    batch, n, dim = features.shape
    grid = math.isqrt(n)
    if grid * grid != n or grid % factor:
        raise ValueError(f"Pixel shuffle by {factor} needs a square patch grid divisible by {factor}, got {n} patches.")
    x = features.reshape(batch, grid // factor, factor, grid // factor, factor, dim)
    x = x.permute(0, 1, 3, 2, 4, 5)  # block row, block col, row in block, col in block
    return x.reshape(batch, (grid // factor) ** 2, factor * factor * dim)


class PixelShuffleConnector(nn.Module):
    """Idefics3 / nanoVLM: trade sequence length for width before projecting."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, text_dim: int):
        super().__init__()
        self.factor = spec.shuffle_factor
        self.mlp = mlp(vision_dim * self.factor**2, text_dim, spec.mlp_depth, spec.act)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(features, self.factor))


class CrossAttentionBlock(nn.Module):
    """Latents attend to image features (grouped-query attention), then a feed-forward layer; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, kv_heads: int, act: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_features = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), ACT2FN[act], nn.Linear(4 * dim, dim))

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        batch, n_latents, dim = latents.shape
        q = self.q(self.norm_latents(latents)).view(batch, n_latents, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(self.norm_features(features)).view(batch, -1, 2, self.kv_heads, self.head_dim).unbind(2)
        attended = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=self.heads != self.kv_heads)
        latents = latents + self.out(attended.transpose(1, 2).reshape(batch, n_latents, dim))
        return latents + self.ffn(self.norm_ffn(latents))


class PerceiverConnector(nn.Module):
    """A fixed number of tokens per image whatever the resolution (Flamingo / Idefics2 style resampler)."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, text_dim: int):
        super().__init__()
        heads, kv_heads = spec.perceiver_heads(text_dim)
        self.proj_in = nn.Linear(vision_dim, text_dim)
        self.latents = nn.Parameter(torch.randn(spec.latents, text_dim) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(text_dim, heads, kv_heads, spec.act) for _ in range(spec.blocks))
        self.norm_out = nn.LayerNorm(text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        latents = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, features)
        return self.norm_out(latents)


def build_connector(spec: ConnectorSpec, vision_dim: int, text_dim: int) -> nn.Module:
    cls = {"mlp": MLPConnector, "pixelshuffle": PixelShuffleConnector, "perceiver": PerceiverConnector}[spec.kind]
    return cls(spec, vision_dim, text_dim)
