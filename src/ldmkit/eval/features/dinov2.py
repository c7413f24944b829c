"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics..."), as their reference code dgm-eval computes them.

The network is transformers' `Dinov2Model`, read from a LOCAL path only, either
  - a folder with config.json + model.safetensors (the `facebook/dinov2-large` hub snapshot), or
  - Meta's own checkpoint `dinov2_vitl14_pretrain.pth` (what dgm-eval's torch.hub call downloads),
    read with torch.load(weights_only=True) and mapped key by key onto `Dinov2Model`.
Preprocessing follows dgm-eval `models/dinov2.py` `transform`: PIL bicubic resize to 224x224 (no
crop), ToTensor, ImageNet mean/std. The feature is the CLS token after the final LayerNorm (the hub
model's `forward` = `x_norm_clstoken`). The official model interpolates its 37x37 position
embeddings to 16x16 with `scale_factor=(16 + 0.1) / 37` (dinov2 `interpolate_pos_encoding`), while
transformers passes `size=16`; we patch in the official formula so features match the hub model.

Meta's file is checked against its SHA-256 (as FID's Inception file is): any other file loads, with an
`UnofficialDINOv2WeightsWarning`, and the report says its FD-DINOv2 is not comparable to published numbers.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.eval.features.common import IMAGENET_MEAN, IMAGENET_STD, file_digest, normalize, resize_like_pil

DINOV2_FILENAME = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILENAME
DINOV2_HF_REPO = "facebook/dinov2-large"
DINOV2_ENV = "LDMKIT_DINOV2_WEIGHTS"
DINOV2_INPUT_SIZE = 224
# SHA-256 and size of Meta's file at DINOV2_URL. Meta publishes no checksum; this is the digest that
# independent projects pin for that download (e.g. manifests that verify RoMa's DINOv2 dependency), all
# agreeing on it and on the size the server reports (Content-Length 1,217,586,395).
DINOV2_SHA256 = "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428"
DINOV2_BYTES = 1_217_586_395

DINOV2_PREPROCESSING = {
    "reference": "dgm-eval models/dinov2.py transform (clean_resize=False)",
    "resize": f"{DINOV2_INPUT_SIZE}x{DINOV2_INPUT_SIZE} bicubic, antialiased, as PIL (no crop)",
    "quantise": "uint8 after resize, as PIL",
    "normalise": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    "pos_embed": "bicubic, scale_factor=(grid + 0.1) / 37, as facebookresearch/dinov2",
    "feature": "CLS token after the final LayerNorm",
}


class DINOv2WeightsNotFoundError(FileNotFoundError):
    """The DINOv2 weights needed for FD-DINOv2 are not on disk."""


class UnofficialDINOv2WeightsWarning(UserWarning):
    """The DINOv2 weights file is not Meta's dinov2_vitl14_pretrain.pth: FD-DINOv2 (and prdc on DINOv2) are not
    comparable to published numbers."""


def hub_dinov2_weights_path() -> Path:
    """Where torch.hub (and so dgm-eval) caches Meta's checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_FILENAME


def resolve_dinov2_weights(path: str | os.PathLike | None = None) -> Path:
    """First existing of: `path`, `$LDMKIT_DINOV2_WEIGHTS`, the torch hub cache. Never downloads."""
    env = os.environ.get(DINOV2_ENV) or None
    hub = hub_dinov2_weights_path()
    candidates = [("dinov2 weights path", path), (f"${DINOV2_ENV}", env), ("torch hub cache", hub)]
    for _, candidate in candidates:
        if candidate is not None and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser()
    looked = "\n".join(f"  - {source}: {candidate if candidate is not None else '(not set)'}"
                       + ("" if candidate is None else " (does not exist)") for source, candidate in candidates)
    raise DINOv2WeightsNotFoundError(
        f"FD-DINOv2 needs the DINOv2 ViT-L/14 weights and they were not found.\nLooked in:\n{looked}\n"
        f"Fix: on a machine with internet, download Meta's checkpoint {DINOV2_URL} to {hub} "
        f"(`mkdir -p {hub.parent} && wget -O {hub} {DINOV2_URL}`), or the hub snapshot "
        f"(`huggingface-cli download {DINOV2_HF_REPO} config.json model.safetensors --local-dir DIR`), "
        f"and point to the file or folder with the metric's weights path or ${DINOV2_ENV}."
    )


def check_official_dinov2(path: Path, sha256: str) -> bool | None:
    """True for Meta's file; False (with UnofficialDINOv2WeightsWarning) for any other file; None for a hub
    snapshot folder, which has no published digest to check against."""
    if path.is_dir():
        return None
    if sha256 == DINOV2_SHA256:
        return True
    warnings.warn(
        f"DINOv2 weights '{path}' are not the official {DINOV2_FILENAME} (SHA-256 {sha256[:16]}..., expected "
        f"{DINOV2_SHA256[:16]}...). FD-DINOv2 and precision/recall/density/coverage on DINOv2 computed with them "
        f"are NOT comparable to published numbers nor to runs with the official weights, only to runs with this "
        f"same file. For comparable numbers use the file from {DINOV2_URL}.",
        UnofficialDINOv2WeightsWarning,
        stacklevel=3,
    )
    return False


def provenance(path: Path, sha256: str, official: bool | None) -> str:
    """One line for the report: which weights file, and whether it is the official one."""
    if official is None:
        return (f"a {DINOV2_HF_REPO} snapshot folder (model.safetensors SHA-256 {sha256[:16]}...; no published "
                f"digest to check it against: {DINOV2_FILENAME} is the checked reference)")
    if official:
        return f"the official {DINOV2_FILENAME} (SHA-256 {sha256[:16]}... verified)"
    return (f"NOT the official {DINOV2_FILENAME} (SHA-256 {sha256[:16]}..., expected {DINOV2_SHA256[:16]}...): "
            "comparable only to runs with this same file, not to published numbers")


def official_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta's DinoVisionTransformer keys -> transformers' Dinov2Model keys (qkv split in three)."""
    out: dict[str, Tensor] = {}
    renames = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
               "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
               "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    for key, value in state.items():
        if key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, -1)
        elif key in renames:
            out[renames[key]] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            prefix = f"encoder.layer.{index}."
            name, kind = rest.rsplit(".", 1) if not rest.endswith("gamma") else (rest, "")
            if name == "attn.qkv":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.{part}.{kind}"] = chunk
            elif name in block:
                out[prefix + block[name] + (f".{kind}" if kind else "")] = value
            else:
                raise ValueError(f"unexpected DINOv2 key {key!r} (only ViT-S/B/L without registers are supported)")
        else:
            raise ValueError(f"unexpected DINOv2 key {key!r} (only ViT-S/B/L without registers are supported)")
    return out


def _config_from_official(state: dict[str, Tensor], path: Path) -> Any:
    from transformers import Dinov2Config

    from ldmkit.nn.weights_file import WeightsFileError

    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    absent = [key for key in needed if key not in state]
    if absent:
        raise WeightsFileError(
            f"'{path}' is not a DINOv2 checkpoint: it has no {', '.join(absent)} (its keys start "
            f"{sorted(state)[:4]}). Give Meta's {DINOV2_FILENAME} ({DINOV2_URL}) or a {DINOV2_HF_REPO} "
            "snapshot folder.")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64 or 1,
                        mlp_ratio=hidden // width, patch_size=patch, image_size=grid * patch,
                        layerscale_value=1.0, layer_norm_eps=1e-6)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors only: torch.load(weights_only=True) or safetensors (`ldmkit.nn.weights_file`); a file that
    needs code to load is refused with UntrustedWeightsError, a corrupt one with WeightsFileError."""
    from ldmkit.nn.weights_file import WeightsFileError, load_state_dict_file, load_torch_file

    what = "DINOv2 weights file (FD-DINOv2)"
    if path.suffix == ".safetensors":
        return load_state_dict_file(path, what)
    state = load_torch_file(path, what)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsFileError(f"{what} '{path}' holds a {type(state).__name__}, not a state dict (a dict of "
                               f"tensors); give Meta's {DINOV2_FILENAME} ({DINOV2_URL}).")
    return state


def load_dinov2(path: str | os.PathLike, num_heads: int | None = None) -> tuple[nn.Module, str]:
    """(Dinov2Model in eval mode, weights digest: 16 hex digits of SHA-256) from a hub-snapshot folder or
    Meta's checkpoint file. `num_heads` overrides the head count inferred for Meta's files (width / 64)."""
    model, sha256 = _load_dinov2(Path(path), num_heads)
    return model, sha256[:16]


def _load_dinov2(path: Path, num_heads: int | None) -> tuple[nn.Module, str]:
    from transformers import Dinov2Model

    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise DINOv2WeightsNotFoundError(
                f"{path} holds no model.safetensors (found {sorted(p.name for p in path.iterdir())[:6]}); "
                f"download `{DINOV2_HF_REPO}` config.json + model.safetensors into it, or pass Meta's {DINOV2_FILENAME}")
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        return _official_pos_embed(model.eval()), file_digest(weights, 64)
    state = _read_state_dict(path)
    config = _config_from_official(state, path)
    if num_heads is not None:
        config.num_attention_heads = num_heads
    model = Dinov2Model(config)
    model.load_state_dict(official_to_transformers(state), strict=True)
    return _official_pos_embed(model.eval()), file_digest(path, 64)


def _official_pos_embed(model: nn.Module) -> nn.Module:
    """Swap in facebookresearch/dinov2's `interpolate_pos_encoding` (scale_factor with the 0.1 offset)."""

    def interpolate_pos_encoding(self: nn.Module, embeddings: Tensor, height: int, width: int) -> Tensor:
        pos = self.position_embeddings
        num_positions = pos.shape[1] - 1
        if embeddings.shape[1] - 1 == num_positions and height == width:
            return pos
        patch = self.patch_embeddings.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        grid = math.isqrt(num_positions)
        h0, w0 = height // patch + 0.1, width // patch + 0.1
        patch_pos = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, D, 37, 37)
        patch_pos = F.interpolate(patch_pos, scale_factor=(h0 / grid, w0 / grid), mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)  # (1, h*w, D)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    model.embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, model.embeddings)
    return model


class DINOv2FeatureExtractor(nn.Module):
    """Images (B, 3, H, W), uint8 or floats in [-1, 1] -> (B, D) float32 CLS features."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 num_heads: int | None = None):
        super().__init__()
        self.weights_path = resolve_dinov2_weights(weights_path)
        model, self.sha256 = _load_dinov2(self.weights_path, num_heads)
        self.official = check_official_dinov2(self.weights_path, self.sha256)
        self.provenance = provenance(self.weights_path, self.sha256, self.official)
        self.net = model.to(device).requires_grad_(False)
        self.dim = int(self.net.config.hidden_size)
        self.identity = {"network": f"dinov2 ViT/{self.net.config.patch_size} width {self.dim} (transformers "
                                    "Dinov2Model)", "weights": self.sha256[:16], "preprocessing": DINOV2_PREPROCESSING}

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 3, 224, 224) normalised float32, on the CPU."""
        return normalize(resize_like_pil(images, DINOV2_INPUT_SIZE), IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        pixels = self.preprocess(images).to(device)
        return self.net(pixel_values=pixels).pooler_output.float()  # (B, D)
