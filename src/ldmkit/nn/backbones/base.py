"""What the UNet, DiT and MMDiT share (pure torch): the backbone contract as a base class, config
building, the forward-input checks and the time input.

`Backbone` gives every arch the contract attributes of ldmkit.nn.backbones read from its config,
`from_preset`, the checks of `forward`'s inputs and gradient checkpointing;
an arch says how its latent size is constrained (`latent_size_multiple`, `_size_rule`). The time
input is the sinusoidal embedding (Vaswani et al. 2017) of the network time followed by a two-layer
SiLU MLP, as in LDM / SD (`time_embed`), DiT / PixArt / SD3 (`t_embedder`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`[cos(t w_i), sin(t w_i)]`, `w_i = max_period^(-i / (dim/2))` (Vaswani et al. 2017, as LDM / SD; diffusers'
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`). Float32, fractional t allowed. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TwoLayerMLP(nn.Module):
    """`linear_2(act(linear_1(x)))`: time / pooled / caption embedders (names as diffusers')."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None, act: str = "silu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim or hidden)
        self.act = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimestepEmbedder(TwoLayerMLP):
    """Network time (B,) -> (B, hidden): `freq_dim` sinusoidal features (float32), cast to the weights'
    dtype, through the SiLU MLP. Parameters `linear_1`, `linear_2`, as a `TwoLayerMLP`."""

    def __init__(self, freq_dim: int, hidden: int) -> None:
        super().__init__(freq_dim, hidden)
        self.freq_dim = freq_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype))


def config_from(cls: type, config: Any, overrides: Mapping[str, Any]) -> Any:
    """`cls` from an instance, a mapping of its fields (JSON, Hydra) or None (defaults), with overrides."""
    if config is None:
        config = cls()
    elif isinstance(config, Mapping):
        config = cls(**{str(k): v for k, v in config.items()})
    elif not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {type(config).__name__}")
    if overrides:
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} fields {unknown}; valid: {fields}")
        config = dataclasses.replace(config, **overrides)
    return config


def batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """The network time as a (B,) tensor on x's device; a scalar (Python or 0-d) is broadcast to the batch."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def renamed_keys(state_dict: Mapping[str, torch.Tensor], renames: list[tuple[str, str]],
                 drop: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """A diffusers state dict under ldmkit's names: each key rewritten by every (regex, replacement) in
    turn, in order; keys in `drop` (deterministic tables ldmkit recomputes) left out."""
    out = {}
    for key, value in state_dict.items():
        if key in drop:
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def attention_mask(context_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool, True = attend -> (B, 1, 1, L), broadcast over heads and queries (SDPA's layout)."""
    return None if context_mask is None else context_mask[:, None, None, :]


class Backbone(nn.Module):
    """Base of the denoising backbones: `forward(x, t, context, pooled, context_mask)` and the contract
    attributes of ldmkit.nn.backbones. A subclass sets `arch`, `config_class` (whose fields include
    `in_channels`, `out_channels`, `context_dim`, `pooled_dim`, `gradient_checkpointing`) and `presets`,
    defines `latent_size_multiple` and `_size_rule`, and calls `super().__init__(config, overrides)`."""

    arch: str
    config_class: type
    presets: Mapping[str, Any] | None = None
    size_knob: str  # the config field that sets latent_size_multiple, named in the error

    def __init__(self, config: Any, overrides: Mapping[str, Any]) -> None:
        """`self.config` from a `config_class` instance, a mapping of its fields or None, with overrides."""
        super().__init__()
        self.config = config_from(self.config_class, config, overrides)
        self.gradient_checkpointing = self.config.gradient_checkpointing

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Backbone:
        """The arch built from `presets[name]` with fields replaced, e.g. `DiT.from_preset("S", context_dim=512)`."""
        presets = cls.presets or {}
        if name not in presets:
            raise KeyError(f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(presets)}")
        return cls(presets[name], **overrides)

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def context_dim(self) -> int | None:
        return self.config.context_dim

    @property
    def pooled_dim(self) -> int | None:
        return self.config.pooled_dim

    @property
    def latent_size_multiple(self) -> int:
        """Latent H and W must be multiples of this (the backbone contract of ldmkit.nn.backbones)."""
        raise NotImplementedError

    def _size_rule(self) -> str:
        """What makes `latent_size_multiple`, for the error (e.g. `patch_size=2`)."""
        raise NotImplementedError

    def _run(self, block: nn.Module, *args: Any) -> Any:
        """`block(*args)`, recomputed in backward instead of stored when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x, context, pooled, context_mask) -> None:
        """Shapes and dtypes only (Python ints: no host syncs, nothing for torch.compile to break on)."""
        name, cfg, m = type(self).__name__, self.config, self.latent_size_multiple
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"{name} expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(
                f"{name} with {self._size_rule()} needs H and W divisible by {m}, got latents {tuple(x.shape[-2:])}: "
                f"change the image resolution or the backbone's {self.size_knob}"
            )
        if cfg.context_dim is not None and (context is None or context.ndim != 3 or context.shape[-1] != cfg.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"{name} was built with context_dim={cfg.context_dim} and needs context of shape (B, L, {cfg.context_dim}), "
                f"got {got}; set the backbone's context_dim to the text encoder's width"
            )
        if cfg.context_dim is None and context is not None:
            raise ValueError(f"{name} was built with context_dim=null (no text conditioning) but was given a context")
        if (cfg.pooled_dim is None) != (pooled is None):
            raise ValueError(
                f"{name} was built with pooled_dim={cfg.pooled_dim} but pooled is "
                f"{'missing' if pooled is None else tuple(pooled.shape)}: pass pooled (B, pooled_dim) exactly when "
                "pooled_dim is set"
            )
        if context_mask is not None and (
            context is None or context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]
        ):
            raise ValueError(
                "context_mask must be a bool tensor of shape (B, L) of the context (True = attend), got "
                f"{context_mask.dtype} {tuple(context_mask.shape)} for context {None if context is None else tuple(context.shape)}"
            )


def add_pooled(temb: torch.Tensor, pooled_embedder: nn.Module | None, pooled: torch.Tensor | None) -> torch.Tensor:
    """The conditioning vector: time embedding + projected pooled text embedding when the arch has one (SD3 sec. 4)."""
    return temb if pooled_embedder is None else temb + pooled_embedder(pooled)


__all__ = ["Backbone", "TimestepEmbedder", "TwoLayerMLP", "add_pooled", "attention_mask", "batch_time", "config_from",
           "renamed_keys", "timestep_embedding"]
