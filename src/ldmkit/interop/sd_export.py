"""Export an ldmkit `ldm` artifact with a UNet backbone as a diffusers StableDiffusionPipeline folder or an
original-layout single file (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`).

The text encoder exports the layers the LDM uses: with clip_skip = k the last k - 1 layers are dropped, so
diffusers' `last_hidden_state` (final LayerNorm applied) is ldmkit's context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldmkit.interop import single_file as sf
from ldmkit.interop.files import MAPPED, artifact_tensors, atomic_output, write_safetensors
from ldmkit.interop.scheduler import scheduler_config
from ldmkit.interop.text import hf_text_config, text_state_to_hf
from ldmkit.interop.tokenizer import write_tokenizer_folder
from ldmkit.interop.unet import diffusers_unet_config, unet_state_to_diffusers
from ldmkit.interop.vae import InteropError, autoencoder_state_to_diffusers, diffusers_autoencoder_config
from ldmkit.nn.autoencoder import AutoencoderConfig
from ldmkit.nn.unet import UNetConfig

SUPPORTED_ARCHS = {"unet": "UNet2DConditionModel"}


def _read_ldm(folder: Path) -> dict[str, Any]:
    tensors, config = artifact_tensors(folder, "ldm")
    version = int(config.get("format_version", 1))
    if version >= 2:
        backbone, process = config["backbone"], dict(config["process"])
        arch, unet_cfg = backbone["arch"], backbone["config"]
        state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        ac = tensors.get("process.alphas_cumprod")
    else:  # schema 1: `unet` + top-level prediction + `schedule.alphas_cumprod`
        arch, unet_cfg = "unet", config["unet"]
        process = {"kind": "vp_discrete", "num_timesteps": config.get("num_timesteps"), "schedule": None, "prediction": config["prediction"]}
        state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
        ac = tensors.get("schedule.alphas_cumprod")
    if arch not in SUPPORTED_ARCHS:
        raise InteropError(f"'{folder}' has a {arch} backbone: export supports {', '.join(SUPPORTED_ARCHS)} backbones "
                           "(StableDiffusionPipeline); DiT/MMDiT export (PixArt / SD3 transformer) is not supported yet.")
    cfg = UNetConfig(**{k: v for k, v in unet_cfg.items() if k != "gradient_checkpointing"})
    return {"config": config, "unet": cfg, "state": state, "process": process, "alphas_cumprod": ac}


def _encoders(config: dict[str, Any], folder: Path) -> tuple[AutoencoderConfig, dict, float, dict[str, Any], dict]:
    paths = {}
    for key in ("autoencoder", "text_encoder"):
        path = Path(config.get(key, ""))
        if not path.is_dir():
            raise InteropError(f"the ldm artifact '{folder}' references its {key} at '{path}', which is not an artifact folder: "
                               "export needs it (copy it back or edit config.json).")
        paths[key] = path
    ae_tensors, ae_config = artifact_tensors(paths["autoencoder"], "autoencoder")
    te_tensors, te_config = artifact_tensors(paths["text_encoder"], "clip")
    if float(ae_config.get("shift_factor", 0.0)) != 0.0:
        raise InteropError(f"the autoencoder's latent shift_factor is {ae_config['shift_factor']}: StableDiffusionPipeline "
                           "has no latent shift, so this model cannot be exported to it.")
    return AutoencoderConfig.from_dict(ae_config["architecture"]), ae_tensors, float(ae_config["scale_factor"]), te_config, te_tensors


def _text(te_config: dict[str, Any], te_tensors: dict, clip_skip: int) -> tuple[dict[str, Any], dict]:
    model_cfg = json.loads(json.dumps(te_config["model_cfg"]))
    layers = int(model_cfg["text_cfg"].get("layers", 12)) - (clip_skip - 1)
    model_cfg["text_cfg"]["layers"] = layers
    state = {k: v for k, v in te_tensors.items() if not k.startswith("visual.")
             and not (k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= layers)}
    return model_cfg, state


def _load(folder: Path) -> dict[str, Any]:
    m = _read_ldm(folder)
    vae_cfg, ae_tensors, scale, te_config, te_tensors = _encoders(m["config"], folder)
    if vae_cfg.latent_channels != m["unet"].in_channels:
        raise InteropError(f"the autoencoder has {vae_cfg.latent_channels} latent channels but the UNet takes {m['unet'].in_channels}.")
    options = m["config"].get("text_encoder_options", {})
    if options.get("context", "tokens") != "tokens":
        raise InteropError(f"'{folder}' was trained with text_context={options['context']!r} (the backbone attends to the "
                           "pooled text embedding); Stable Diffusion's UNet attends to the text encoder's token states only, "
                           "so diffusers/A1111 would condition it differently. Only text_context=tokens models export.")
    clip_skip = int(options.get("clip_skip", 1))
    text_cfg, text_state = _text(te_config, te_tensors, clip_skip)
    interop = m["config"].get("interop", {})
    return {**m, "vae": vae_cfg, "vae_state": ae_tensors, "scale": scale, "text_cfg": text_cfg, "text_state": text_state,
            # SD 1.x files hold 1x1-conv transformer projections, SD 2.x linear ones: an ldmkit-trained model with
            # an SD 1.x-style (QuickGELU) text encoder is written the SD 1.x way unless its import recorded otherwise
            "linear_projection": bool(interop.get("use_linear_projection", not text_cfg.get("quick_gelu", False))),
            "upcast_attention": bool(interop.get("upcast_attention", False)),
            "resolution": int(m["config"].get("resolution", 512))}


def export_diffusers(ldm: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A folder that `StableDiffusionPipeline.from_pretrained(out)` loads offline."""
    with MAPPED.session():
        return _export_diffusers(Path(ldm), Path(out), overwrite)


def _export_diffusers(ldm: Path, out: Path, overwrite: bool) -> Path:
    m = _load(ldm)
    f = m["vae"].downsampling_factor
    vae_kwargs = diffusers_autoencoder_config(m["vae"], scaling_factor=m["scale"], sample_size=m["resolution"])
    unet_kwargs = diffusers_unet_config(m["unet"], linear_projection=m["linear_projection"],
                                        sample_size=m["resolution"] // f, upcast_attention=m["upcast_attention"])
    text_kwargs = hf_text_config(m["text_cfg"])
    pad_id = int((m["text_cfg"]["text_cfg"].get("tokenizer_kwargs") or {}).get("pad_id", 0))
    with atomic_output(out, overwrite, "export") as tmp:
        _component(tmp / "unet", {"_class_name": "UNet2DConditionModel", **unet_kwargs},
                   unet_state_to_diffusers(m["state"], linear_projection=m["linear_projection"]), "diffusion_pytorch_model")
        _component(tmp / "vae", {"_class_name": "AutoencoderKL", **vae_kwargs}, autoencoder_state_to_diffusers(m["vae_state"]),
                   "diffusion_pytorch_model")
        _component(tmp / "text_encoder", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text_kwargs},
                   text_state_to_hf(m["text_state"]), "model")
        write_tokenizer_folder(tmp / "tokenizer", pad_id, int(m["text_cfg"]["text_cfg"].get("context_length", 77)))
        (tmp / "scheduler").mkdir()
        sched = scheduler_config(m["process"], m["alphas_cumprod"], m["process"]["prediction"])
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", sched["_class_name"]],
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False}, indent=2))
    return out


def _component(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], stem: str) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / f"{stem}.safetensors", tensors, {"format": "pt"})


def export_single_file(ldm: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """One `.safetensors` in the original CompVis/Stability layout (what A1111/ComfyUI-style loaders read)."""
    with MAPPED.session():
        return _export_single_file(Path(ldm), Path(out), overwrite)


def _export_single_file(ldm: Path, out: Path, overwrite: bool) -> Path:
    if out.suffix != ".safetensors":
        raise InteropError(f"single-file export writes safetensors: name the output '*.safetensors', got '{out.name}'.")
    m = _load(ldm)
    cfg: UNetConfig = m["unet"]
    prefixes = sf.unet_prefix_map(len(cfg.channel_mult), cfg.num_res_blocks, cfg.attention_levels)
    tensors = {sf.unet_to_original(k, prefixes): v
               for k, v in unet_state_to_diffusers(m["state"], linear_projection=m["linear_projection"]).items()}
    vae = m["vae"]
    tensors.update(sf.vae_state_to_original(autoencoder_state_to_diffusers(m["vae_state"]), len(vae.channel_mult), vae.num_res_blocks))
    if m["text_cfg"].get("quick_gelu"):  # SD 1.x: HF CLIPTextModel names
        tensors.update({sf.SD1_TEXT_PREFIX + k: v for k, v in text_state_to_hf(m["text_state"]).items()})
    else:  # SD 2.x: open_clip names; SD 2.x files hold one more layer than SD uses (it takes the penultimate)
        text = dict(m["text_state"])
        last = int(m["text_cfg"]["text_cfg"]["layers"]) - 1
        unused = f"transformer.resblocks.{last + 1}."
        text.update({k.replace(f"transformer.resblocks.{last}.", unused): v for k, v in m["text_state"].items()
                     if k.startswith(f"transformer.resblocks.{last}.")})  # a copy of the last used one, never run
        tensors.update({sf.SD2_TEXT_PREFIX + k: v for k, v in text.items()})
    if out.exists() and not overwrite:
        raise InteropError(f"export target '{out}' already exists: pass overwrite=true to replace it, or choose a new out=.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{id(tensors)}")
    try:
        import dataclasses

        write_safetensors(tmp, tensors, {"format": "pt", "ldmkit_prediction": m["process"]["prediction"],
                                         "ldmkit_unet": json.dumps(dataclasses.asdict(cfg))})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
