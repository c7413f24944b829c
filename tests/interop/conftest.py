"""Tiny SD-1.x- and SD-2.x-shaped StableDiffusionPipelines with random weights, saved as diffusers folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def build_pipeline(family: str):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    sd2 = family == "sd2"
    torch.manual_seed(0 if sd2 else 1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=[2, 4] if sd2 else 8, norm_num_groups=32, use_linear_projection=sd2, sample_size=8)
    for p in unet.parameters():  # diffusers zero-initialises conv_out: give every weight a value
        p.data.normal_(0, 0.05)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        hidden_act="gelu" if sd2 else "quick_gelu"))
    return unet.eval(), vae.eval(), text.eval()


def save_pipeline(family: str, folder: Path) -> Path:
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from ldmkit.interop.tokenizer import write_tokenizer_folder

    unet, vae, text = build_pipeline(family)
    sd2 = family == "sd2"
    write_tokenizer_folder(folder / "tokenizer", 0 if sd2 else 49407)  # SD 2.x pads with "!", SD 1.x with <|endoftext|>
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {family: save_pipeline(family, root / family) for family in ("sd1", "sd2")}
