"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", Eq. 1) with a VGG16 backbone, pure torch.

Nothing is downloaded: both weight files are read from local paths.
- the VGG16 ImageNet weights of torchvision, `vgg16-397923af.pth`
  (https://download.pytorch.org/models/vgg16-397923af.pth; torchvision caches it under
  `$TORCH_HOME/hub/checkpoints/`), full model or `features` only;
- the LPIPS linear heads, `vgg.pth` of the `lpips` package (`lpips/weights/v0.1/vgg.pth`,
  https://github.com/richzhang/PerceptualSimilarity); torchmetrics ships the same file, which
  is used when no path is given.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from ldmkit.nn.weights_file import load_state_dict_file

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# torchvision's VGG16 `features` layout ("M" = max-pool); LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAP_INDICES = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSWeightsNotFound(FileNotFoundError):
    """An LPIPS weight file is missing; the message names the file and where to put it."""


def default_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE


def default_lin_path() -> Path | None:
    # locate torchmetrics' copy without importing it (keeps ldmkit.nn free of lightning_utilities)
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "functional" / "image" / "lpips_models" / LIN_FILE


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(prev, item, 3, padding=1), nn.ReLU(inplace=False)]
            prev = item
    return nn.Sequential(*layers)


def _require(path: Path | None, what: str, filename: str, url: str, option: str) -> Path:
    if path is None or not path.is_file():
        where = f"'{path}'" if path is not None else "no default location"
        raise LPIPSWeightsNotFound(
            f"LPIPS perceptual loss needs {what} '{filename}', not found at {where}. Download it from {url} "
            f"and put it at that path, or set {option}=/path/to/{filename} (or turn the perceptual loss off "
            "with model.lpips=null)."
        )
    return path


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance; `forward(x, y)` takes images in [-1, 1] and returns (B,) distances."""

    def __init__(self, vgg_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        vgg_path = _require(
            Path(vgg_weights) if vgg_weights else default_vgg_path(),
            "the torchvision VGG16 ImageNet weights", VGG_FILE, VGG_URL, "model.lpips.vgg_weights",
        )
        lin_path = _require(
            Path(lin_weights) if lin_weights else default_lin_path(),
            "the LPIPS linear-layer weights", LIN_FILE, LIN_URL, "model.lpips.lin_weights",
        )
        self.features = _vgg16_features()[: _TAP_INDICES[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        # ImageNet-style input scaling of the LPIPS repo (ScalingLayer), for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(vgg_path, lin_path)
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_path: Path, lin_path: Path) -> None:
        # weights_only reader: a file that needs code to load is refused (UntrustedWeightsError)
        vgg = load_state_dict_file(vgg_path, "LPIPS VGG16 weights file (model.lpips.vgg_weights)")
        vgg = {k.removeprefix("features."): v for k, v in vgg.items() if not k.startswith("classifier.")}
        vgg = {k: v for k, v in vgg.items() if int(k.split(".")[0]) <= _TAP_INDICES[-1]}
        try:
            self.features.load_state_dict(vgg, strict=True)
        except RuntimeError as err:
            raise ValueError(f"'{vgg_path}' is not torchvision's VGG16 weight file ({VGG_FILE}): {err}") from err
        lin = load_state_dict_file(lin_path, "LPIPS linear-layer weights file (model.lpips.lin_weights)")
        try:
            # the lpips package names the heads lin{i}.model.1.weight (Dropout, Conv)
            self.lins.load_state_dict({f"{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(_TAP_CHANNELS))})
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"'{lin_path}' is not the LPIPS VGG linear-layer file ({LIN_FILE}): {err}") from err

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen, whatever the parent module does

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        start = 0
        for lin, tap in zip(self.lins, _TAP_INDICES):
            block = self.features[start : tap + 1]
            h_x, h_y = block(h_x), block(h_y)
            start = tap + 1
            diff = (_unit_normalize(h_x) - _unit_normalize(h_y)).pow(2)  # (B, C_l, H_l, W_l)
            dist = dist + lin(diff).float().mean(dim=(1, 2, 3))
        return dist


def _unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)

