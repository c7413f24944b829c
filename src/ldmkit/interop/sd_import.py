"""Import Stable Diffusion 1.x/2.x (diffusers folder or original single file) as three ldmkit artifacts.

    out/autoencoder   the VAE, latent scale 0.18215 recorded (SD's value, not measured)
    out/text_encoder  a clip artifact whose text tower is SD's text encoder (use as model.text_encoder=)
    out/ldm           the UNet with its noise process and prediction (schema version 2)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmkit.interop import single_file as sf
from ldmkit.interop.files import MAPPED, LazyTensors, atomic_output, write_artifact
from ldmkit.interop.scheduler import SD_SCHEDULER, process_from_scheduler
from ldmkit.interop.text import clip_model_cfg_from_hf, complete_clip_state, text_state_from_hf
from ldmkit.interop.tokenizer import pad_id_from_tokenizer_folder
from ldmkit.interop.unet import SD_NORM_EPS, unet_config_from_diffusers
from ldmkit.interop.vae import SD_LATENT_SCALE, InteropError, autoencoder_config_from_diffusers, autoencoder_state_from_diffusers
from ldmkit.nn.autoencoder import AutoencoderConfig
from ldmkit.nn.unet import UNetConfig, state_dict_from_diffusers

LDM_FORMAT_VERSION = 2
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")  # the same three models
OTHER_FAMILIES = (("StableDiffusionXL", "SDXL"), ("StableDiffusion3", "SD3"), ("Flux", "Flux"), ("PixArt", "PixArt"),
                  ("Kandinsky", "Kandinsky"), ("StableCascade", "Stable Cascade"))
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass
class Imported:
    """The three models of an SD checkpoint, in ldmkit's names and configs."""

    family: str
    unet: UNetConfig
    unet_state: dict[str, torch.Tensor]
    vae: AutoencoderConfig
    vae_state: dict[str, torch.Tensor]
    clip_cfg: dict[str, Any]
    text_state: dict[str, torch.Tensor]
    process: dict[str, Any]
    alphas_cumprod: torch.Tensor
    prediction: str
    resolution: int
    interop: dict[str, Any] = field(default_factory=dict)


def _weights(folder: Path, component: str) -> list[Path]:
    sub = folder / component
    for name in WEIGHT_NAMES:
        if (sub / name).is_file():
            return [sub / name]
    shards = sorted(sub.glob("*.safetensors")) or sorted(sub.glob("*.bin"))
    if shards:
        return shards
    raise InteropError(f"diffusers folder '{folder}' has no weights in '{component}/' (expected {WEIGHT_NAMES[0]} or "
                       f"{WEIGHT_NAMES[1]}): copy the complete model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).")


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InteropError(f"cannot read '{path}' ({err}); the folder is incomplete or corrupt.") from err


def _check_pipeline_class(folder: Path) -> None:
    index = folder / "model_index.json"
    cls = _json(index).get("_class_name") if index.is_file() else None
    if cls and cls not in SD_PIPELINES:
        family = next((name for prefix, name in OTHER_FAMILIES if cls.startswith(prefix)), None)
        what = f"a {cls} ({family}): {family} is" if family else f"a {cls}, which is"
        raise InteropError(f"'{folder}' holds {what} not supported yet; {sf.SUPPORTED} are "
                           "(StableDiffusionPipeline folders or their single files).")


def read_diffusers_folder(folder: Path) -> Imported:
    _check_pipeline_class(folder)
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise InteropError(f"diffusers folder '{folder}' is missing {', '.join(f'{m}/' for m in missing)}: a Stable Diffusion "
                           f"folder needs {', '.join(f'{c}/' for c in COMPONENTS)} (as save_pretrained writes them). Copy the "
                           "complete model folder, or pass the model's single-file checkpoint (.safetensors) instead.")
    unet_json, vae_json = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    text_json = _json(folder / "text_encoder" / "config.json")
    sched_json = _json(folder / "scheduler" / "scheduler_config.json")
    if unet_json.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise InteropError(f"unet/ holds a {unet_json.get('_class_name')}: not supported yet (SD 1.x/2.x UNets are).")
    unet = unet_config_from_diffusers(unet_json)
    vae = autoencoder_config_from_diffusers(vae_json)
    pad_id = pad_id_from_tokenizer_folder(folder / "tokenizer")
    clip_cfg = clip_model_cfg_from_hf(text_json, pad_id=pad_id)
    family = "sd2" if text_json.get("hidden_act") == "gelu" else "sd1"
    process, alphas_cumprod, prediction = process_from_scheduler(sched_json)
    unet_state = state_dict_from_diffusers(LazyTensors(_weights(folder, "unet")))
    vae_state = autoencoder_state_from_diffusers(LazyTensors(_weights(folder, "vae")))
    text_state = complete_clip_state(text_state_from_hf(LazyTensors(_weights(folder, "text_encoder"))), clip_cfg)
    proj = next((v for k, v in unet_state.items() if k.endswith("proj_in.weight")), None)
    return Imported(family, unet, unet_state, vae, vae_state, clip_cfg, text_state, process, alphas_cumprod, prediction,
                    resolution=int(unet_json.get("sample_size", 64)) * vae.downsampling_factor,
                    interop={"use_linear_projection": bool(unet_json.get("use_linear_projection", proj is None)),
                             "norm_eps": float(unet_json.get("norm_eps", SD_NORM_EPS)),
                             "upcast_attention": bool(unet_json.get("upcast_attention", False)),
                             "scheduler": sched_json, "scaling_factor": float(vae_json.get("scaling_factor", SD_LATENT_SCALE))})


def _count(keys: list[str], pattern: str) -> int:
    import re

    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def read_single_file(path: Path, prediction: str | None = None) -> Imported:
    tensors = LazyTensors([path])
    keys = list(tensors)
    family = sf.detect_family(keys)
    unet_keys = [k for k in keys if k.startswith(sf.UNET_PREFIX)]
    foreign = [k for k in keys if not k.startswith((sf.UNET_PREFIX, sf.VAE_PREFIX, sf.SD1_TEXT_PREFIX, sf.SD2_TEXT_PREFIX))
               and not k.startswith(sf.IGNORED_PREFIXES)]
    if foreign:
        raise InteropError(f"'{path}' has {len(foreign)} keys that belong to no Stable Diffusion component "
                           f"(e.g. {', '.join(foreign[:3])}): it is another model's checkpoint or was edited.")
    recorded = tensors.metadata.get("ldmkit_unet")  # written by ldmkit's single-file export: the exact config
    unet = UNetConfig(**json.loads(recorded)) if recorded else _unet_config_from_shapes(tensors, unet_keys, family)
    prediction = prediction or tensors.metadata.get("ldmkit_prediction")
    unet_diffusers = _unet_state_from_original(tensors, unet)
    vae_orig = tensors.subset(sf.VAE_PREFIX)
    if not len(vae_orig):
        raise InteropError(f"'{path}' has no VAE ('{sf.VAE_PREFIX}*'): import a full checkpoint or a diffusers folder.")
    vae_keys = list(vae_orig)
    vae = AutoencoderConfig(
        base_channels=int(vae_orig["encoder.conv_in.weight"].shape[0]), in_channels=int(vae_orig["encoder.conv_in.weight"].shape[1]),
        channel_mult=tuple(int(vae_orig[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // int(vae_orig["encoder.conv_in.weight"].shape[0])
                           for i in range(_count(vae_keys, r"encoder\.down\.(\d+)\."))),
        num_res_blocks=_count(vae_keys, r"encoder\.down\.0\.block\.(\d+)\."), latent_channels=int(vae_orig["post_quant_conv.weight"].shape[0]),
        out_channels=int(vae_orig["decoder.conv_out.weight"].shape[0]), num_groups=32, asymmetric_downsample=True)
    vae_state = autoencoder_state_from_diffusers(sf.vae_state_from_original(vae_orig, len(vae.channel_mult), vae.num_res_blocks))
    if family == "sd1":
        hf = tensors.subset(sf.SD1_TEXT_PREFIX)
        text = text_state_from_hf(hf)
        pad_id = 49407
    else:
        oc = tensors.subset(sf.SD2_TEXT_PREFIX)
        layers = _count(list(oc), r"transformer\.resblocks\.(\d+)\.")
        text = {k: oc[k] for k in oc if k not in ("text_projection", "logit_scale", "attn_mask")
                and not k.startswith(f"transformer.resblocks.{layers - 1}.")}  # SD 2.x uses the penultimate layer
        pad_id = 0
    width = int(text["token_embedding.weight"].shape[1])
    text_layers = _count(list(text), r"transformer\.resblocks\.(\d+)\.")
    hf_cfg = {"hidden_size": width, "num_attention_heads": max(1, width // 64), "num_hidden_layers": text_layers,
              "intermediate_size": int(text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
              "max_position_embeddings": int(text["positional_embedding"].shape[0]),
              "hidden_act": "quick_gelu" if family == "sd1" else "gelu"}
    clip_cfg = clip_model_cfg_from_hf(hf_cfg, pad_id=pad_id)
    text_state = complete_clip_state(text, clip_cfg)
    if prediction is None:
        if family == "sd2":  # diffusers' rule for SD 2.x single files: only the 512-base checkpoint (step 875000) predicts eps
            prediction = "eps" if tensors.extra.get("global_step") == 875000 else "v"
            print(f"[ldmkit.interop] {path.name}: SD 2.x single file, prediction={prediction} assumed "
                  "(pass prediction=eps for 512-base models, prediction=v for 768-v ones)")
        else:
            prediction = "eps"
    process, alphas_cumprod, _ = process_from_scheduler(SD_SCHEDULER)
    return Imported(family, unet, state_dict_from_diffusers(unet_diffusers), vae, vae_state, clip_cfg, text_state, process,
                    alphas_cumprod, prediction, resolution=768 if family == "sd2" and prediction == "v" else 512,
                    interop={"use_linear_projection": family == "sd2", "norm_eps": SD_NORM_EPS, "upcast_attention": family == "sd2",
                             "scaling_factor": SD_LATENT_SCALE})


def _unet_config_from_shapes(t: LazyTensors, keys: list[str], family: str) -> UNetConfig:
    p = sf.UNET_PREFIX
    ch = int(t[p + "input_blocks.0.0.weight"].shape[0])
    body = [k[len(p):] for k in keys]
    blocks = _count(body, r"input_blocks\.(\d+)\.")
    downs = sorted({int(k.split(".")[1]) for k in body if ".op." in k})
    levels = len(downs) + 1
    layers = (blocks - 1 - len(downs)) // levels
    widths, attention = [], []
    for i in range(levels):
        first = 1 + i * (layers + 1)
        widths.append(int(t[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        if any(k.startswith(f"input_blocks.{first}.1.") for k in body):
            attention.append(i)
    attn2 = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    depth = _count(body, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    return UNetConfig(
        in_channels=int(t[p + "input_blocks.0.0.weight"].shape[1]), out_channels=int(t[p + "out.2.weight"].shape[0]),
        model_channels=ch, channel_mult=tuple(w // ch for w in widths), num_res_blocks=layers, attention_levels=tuple(attention),
        num_heads=8 if family == "sd1" else None, head_dim=None if family == "sd1" else 64, transformer_depth=depth,
        context_dim=int(t[attn2].shape[1]), norm_groups=32, norm_eps=SD_NORM_EPS)


def _unet_state_from_original(t: LazyTensors, cfg: UNetConfig) -> dict[str, torch.Tensor]:
    inverse = sf.unet_from_original(sf.unet_prefix_map(len(cfg.channel_mult), cfg.num_res_blocks, cfg.attention_levels))
    out = {}
    for key in t:
        if key.startswith(sf.UNET_PREFIX):
            out[sf.unet_key_from_original(key, inverse)] = t[key]
    return out


def check_compatible(m: Imported) -> None:
    if m.vae.latent_channels != m.unet.in_channels or m.unet.out_channels != m.vae.latent_channels:
        raise InteropError(f"the VAE has {m.vae.latent_channels} latent channels but the UNet takes {m.unet.in_channels} and "
                           f"predicts {m.unet.out_channels}: these components come from different models.")
    width = int(m.clip_cfg["text_cfg"]["width"])
    if m.unet.context_dim != width:
        raise InteropError(f"the UNet cross-attends to {m.unet.context_dim}-wide text tokens but the text encoder is {width} wide: "
                           "these components come from different models.")


def import_checkpoint(src: str | Path, out: str | Path, *, prediction: str | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Read `src` (diffusers folder or single file) and write out/{autoencoder,text_encoder,ldm}; returns their paths."""
    with MAPPED.session():
        return _import(Path(src), Path(out), prediction, overwrite)


def _import(src: Path, out: Path, prediction: str | None, overwrite: bool) -> dict[str, Path]:
    if src.is_dir():
        model = read_diffusers_folder(src)
        if prediction is not None and prediction != model.prediction:
            raise InteropError(f"prediction={prediction} contradicts the folder's scheduler ({model.prediction}); drop the option.")
    elif src.is_file():
        if src.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise InteropError(f"'{src}' is not a checkpoint (.safetensors or .ckpt) or a diffusers folder.")
        model = read_single_file(src, prediction)
    else:
        raise InteropError(f"'{src}' does not exist: pass a diffusers folder (with unet/, vae/, ...) or a .safetensors/.ckpt file.")
    check_compatible(model)
    MAPPED.release_all()  # the pages the fused Q/K/V copies read
    return write_imported(model, out, overwrite=overwrite, source=str(src.resolve()))


def write_imported(m: Imported, out: Path, *, overwrite: bool, source: str) -> dict[str, Path]:
    from ldmkit.artifacts import FORMAT_VERSION, weights_hash

    final = {name: (out / name).resolve() for name in ("autoencoder", "text_encoder", "ldm")}
    with atomic_output(out, overwrite, "import") as tmp:
        write_artifact(tmp / "autoencoder", "autoencoder", m.vae_state, {
            "architecture": m.vae.to_dict(), "latent_channels": m.vae.latent_channels,
            "downsampling_factor": m.vae.downsampling_factor, "resolution": None,
            "scale_factor": m.interop.get("scaling_factor", SD_LATENT_SCALE), "shift_factor": 0.0,
            "latent_stats": {"recorded": "Stable Diffusion's scaling_factor (not measured)"}, "source": source}, FORMAT_VERSION)
        text = m.clip_cfg["text_cfg"]
        write_artifact(tmp / "text_encoder", "clip", m.text_state, {
            "model_name": None, "model_cfg": m.clip_cfg, "embed_dim": int(m.clip_cfg["embed_dim"]), "text_width": int(text["width"]),
            "text_layers": int(text["layers"]), "context_length": int(text["context_length"]), "pooled_dim": int(m.clip_cfg["embed_dim"]),
            "tokenizer": {"model_name": None, "context_length": int(text["context_length"]),
                          "pad_id": int((text.get("tokenizer_kwargs") or {}).get("pad_id", 0))},
            "image_tower": "placeholder of zeros: this artifact is a text encoder only (imported from Stable Diffusion)",
            "source": source}, FORMAT_VERSION)
        hashes = {k: weights_hash(tmp / k) for k in ("autoencoder", "text_encoder")}
        tensors = {f"backbone.{k}": v for k, v in m.unet_state.items()}
        tensors["process.alphas_cumprod"] = m.alphas_cumprod.to(torch.float64)
        write_artifact(tmp / "ldm", "ldm", tensors, {
            "backbone": {"arch": "unet", "config": dataclasses.asdict(m.unet)},
            "process": {**m.process, "prediction": m.prediction},
            "autoencoder": str(final["autoencoder"]), "text_encoder": str(final["text_encoder"]),
            "text_encoder_options": {"clip_skip": 1, "model_name": None}, "encoders": hashes,
            "latent": {"channels": m.vae.latent_channels, "downsampling_factor": m.vae.downsampling_factor,
                       "scale_factor": m.interop.get("scaling_factor", SD_LATENT_SCALE), "shift_factor": 0.0},
            "resolution": m.resolution, "weights": "imported",
            "interop": {"family": m.family, "source": source, **{k: v for k, v in m.interop.items() if k != "scaling_factor"}},
        }, LDM_FORMAT_VERSION)
    return final
