"""The original single-file layout at full SD-1.5 / SD-2.1 size (built on meta): our mapping's keys, converted back
by diffusers' own `single_file_utils` conversions, give exactly diffusers' keys and shapes; shapes alone give the
UNet config back."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from ldmkit.interop import single_file as sf  # noqa: E402
from ldmkit.interop.sd_import import _unet_config_from_shapes  # noqa: E402
from ldmkit.interop.text import text_state_from_hf  # noqa: E402
from ldmkit.interop.unet import unet_config_from_diffusers  # noqa: E402
from tests.interop.test_components import SD15_UNET, SD21_UNET, SD2_TEXT, SD_VAE, _shapes  # noqa: E402


@pytest.mark.parametrize(("spec", "family"), [(SD15_UNET, "sd1"), (SD21_UNET, "sd2")], ids=["sd15", "sd21"])
def test_unet_original_layout_matches_diffusers_conversion(spec, family) -> None:
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**spec)
    cfg = unet_config_from_diffusers(ref.config)
    prefixes = sf.unet_prefix_map(len(cfg.channel_mult), cfg.num_res_blocks, cfg.attention_levels)
    original = {sf.unet_to_original(k, prefixes): v for k, v in ref.state_dict().items()}
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original  # SD's upsampler after a plain up block
    converted = sfu.convert_ldm_unet_checkpoint(original, dict(ref.config))
    assert _shapes(converted) == _shapes(ref.state_dict())
    assert _unet_config_from_shapes(original, list(original), family) == cfg
    inverse = sf.unet_from_original(prefixes)
    assert {sf.unet_key_from_original(k, inverse) for k in original} == set(ref.state_dict())


def test_vae_original_layout_matches_diffusers_conversion() -> None:
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**SD_VAE)
    original = sf.vae_state_to_original(ref.state_dict(), 4, 2)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in original and original[
        "first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    converted = sfu.convert_ldm_vae_checkpoint(original, dict(ref.config))
    assert _shapes(converted) == _shapes(ref.state_dict())
    assert _shapes(sf.vae_state_from_original(original, 4, 2)) == _shapes(ref.state_dict())


def test_sd2_text_original_layout_matches_diffusers_conversion() -> None:
    config = transformers.CLIPTextConfig(vocab_size=49408, **SD2_TEXT)
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(config)
    original = {sf.SD2_TEXT_PREFIX + k: v for k, v in text_state_from_hf(ref.state_dict()).items()}
    converted = sfu.convert_open_clip_checkpoint(ref, original)
    want = {k.removeprefix("text_model."): v for k, v in _shapes(ref.state_dict()).items() if "position_ids" not in k}
    assert {k.removeprefix("text_model."): v for k, v in _shapes(converted).items() if "position_ids" not in k} == want
