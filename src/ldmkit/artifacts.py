"""Stage outputs as folders: ``weights.safetensors`` + ``config.json``.

An artifact is what one stage hands to the next (see DESIGN.md, "Layering"): the
architecture and the facts the next stage needs, never pickled code. Writes are
atomic (a temporary sibling folder renamed into place) so a crash mid-export never
leaves a half-written artifact where a later stage would find it.

Schema versions (`format_version` in config.json; readers accept every earlier one):
- 1: an `ldm` artifact records its network as `unet` (UNetConfig fields) with tensors `unet.*`, the
  prediction at the top level and the discrete schedule as the tensor `schedule.alphas_cumprod`.
- 2: an `ldm` artifact records `backbone` = {arch, config} (tensors `backbone.*`) and `process` =
  {kind, its parameters, prediction} (tensors `process.*`), plus `encoders`, the weights hashes of the
  frozen autoencoder and text encoder. `read_ldm_artifact` reads both as version 2.
Autoencoder and clip artifacts did not change between 1 and 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2

# Which command writes each kind of artifact, quoted in every error a user can hit.
PRODUCERS = {
    "autoencoder": "python train.py model=autoencoder",
    "clip": "python train.py model=clip",
    "ldm": "python train.py model=ldm",
}


class ArtifactError(ValueError):
    """An artifact folder is missing, corrupt, or of the wrong kind."""


def _producer_hint(kind: str) -> str:
    command = PRODUCERS.get(kind)
    return f" It is written by `{command}` (see the folder `artifact/` in that run's output directory)." if command else ""


def save_artifact(folder: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``config`` (JSON-serialisable) as an artifact of ``kind``; returns the folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "format_version": FORMAT_VERSION, **config}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / WEIGHTS_FILE), metadata={"kind": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(backup)
            tmp.rename(folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_artifact_config(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Read and validate only ``config.json`` (cheap: used to fail fast before heavy work)."""
    folder = Path(folder)
    expected = kind or "artifact"
    if not folder.is_dir():
        raise ArtifactError(
            f"No {expected} artifact at '{folder}': the folder does not exist.{_producer_hint(kind or '')} "
            "Pass the path of an existing artifact folder."
        )
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ArtifactError(
            f"'{folder}' is not an ldmkit artifact: it has no {CONFIG_FILE}.{_producer_hint(kind or '')}"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"'{config_path}' is not valid JSON ({err}); the artifact is corrupt, re-export it.{_producer_hint(kind or '')}") from err
    if kind is not None and config.get("kind") != kind:
        raise ArtifactError(
            f"'{folder}' holds a '{config.get('kind')}' artifact, but a '{kind}' artifact is needed here."
            f"{_producer_hint(kind)}"
        )
    return config


def load_artifact(folder: str | os.PathLike, kind: str | None = None, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, config)`` from an artifact folder, checking its kind."""
    folder = Path(folder)
    config = read_artifact_config(folder, kind)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"'{folder}' has {CONFIG_FILE} but no {WEIGHTS_FILE}; the export was interrupted, re-export it.{_producer_hint(config.get('kind', ''))}")
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ArtifactError(f"'{weights}' cannot be read ({err}); the file is truncated or corrupt, re-export it.{_producer_hint(config.get('kind', ''))}") from err
    return tensors, config


def weights_hash(folder: str | os.PathLike, length: int = 10) -> str:
    """Short SHA-256 of the weights file (the 'model hash' written into PNG parameters)."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def require_key(config: dict[str, Any], key: str, folder: str | os.PathLike, fix: str | None = None) -> Any:
    """config[key], or an ArtifactError naming the key, the file and the fix."""
    if key not in config:
        kind = config.get("kind", "")
        fix = fix or (f"Re-export the artifact (`{PRODUCERS[kind]}` writes it), or add '{key}' to the file by hand."
                      if kind in PRODUCERS else f"Re-export the artifact, or add '{key}' to the file by hand.")
        raise ArtifactError(f"'{Path(folder) / CONFIG_FILE}' has no '{key}', which this {kind or 'artifact'} needs. {fix}")
    return config[key]


@dataclass
class LDMArtifact:
    """An `ldm` artifact read as schema version 2, whatever version it was written with."""

    config: dict[str, Any]  # the whole config.json, upgraded: `backbone`, `process` (with `prediction`), paths, latent
    backbone: dict[str, Any]  # {"arch", "config"}
    backbone_state: dict[str, torch.Tensor]  # the backbone's state dict (prefix removed)
    process: dict[str, Any]  # {"kind", parameters..., "prediction"}
    process_tensors: dict[str, torch.Tensor]  # (prefix removed)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_ldm_artifact(folder: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LDMArtifact:
    """Interpret an `ldm` artifact's (config, tensors) from `load_artifact`, upgrading version 1."""
    version = int(config.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ArtifactError(f"'{Path(folder) / CONFIG_FILE}' has format_version {version}, newer than this ldmkit reads "
                            f"({FORMAT_VERSION}); upgrade ldmkit to load it.")
    for key in ("autoencoder", "text_encoder", "latent"):
        require_key(config, key, folder)
    if version == 1:
        backbone = {"arch": "unet", "config": require_key(config, "unet", folder)}
        process = {"kind": "vp_discrete", "num_timesteps": config.get("num_timesteps"), "schedule": None,
                   "prediction": require_key(config, "prediction", folder)}
        config = {**config, "backbone": backbone, "process": process}
        return LDMArtifact(config, backbone, _strip(tensors, "unet."), process,
                           {"alphas_cumprod": tensors["schedule.alphas_cumprod"]} if "schedule.alphas_cumprod" in tensors else {})
    backbone, process = require_key(config, "backbone", folder), require_key(config, "process", folder)
    for part, keys in (("backbone", ("arch", "config")), ("process", ("kind", "prediction"))):
        for key in keys:
            if key not in config[part]:
                raise ArtifactError(f"'{Path(folder) / CONFIG_FILE}' has no '{part}.{key}', which this ldm needs. "
                                    f"Re-export the artifact (`{PRODUCERS['ldm']}` writes it).")
    return LDMArtifact(config, backbone, _strip(tensors, "backbone."), process, _strip(tensors, "process."))


def ldm_artifact(backbone_spec: dict[str, Any], backbone_state: dict[str, torch.Tensor], process_config: dict[str, Any],
                 process_tensors: dict[str, torch.Tensor], prediction: str, *, autoencoder: str, text_encoder: str,
                 text_encoder_options: dict[str, Any], latent: dict[str, Any], encoders: dict[str, str] | None = None,
                 **extra: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of a version-2 `ldm` artifact: everything needed to rebuild the generator."""
    tensors = {f"backbone.{k}": v for k, v in backbone_state.items()}
    tensors.update({f"process.{k}": v for k, v in process_tensors.items()})
    config = {
        "backbone": backbone_spec,
        "process": {**process_config, "prediction": prediction},
        "autoencoder": str(Path(autoencoder).resolve()),
        "text_encoder": str(Path(text_encoder).resolve()),
        "text_encoder_options": text_encoder_options,
        "encoders": dict(encoders or {}),
        "latent": latent,
        **extra,
    }
    return tensors, config
