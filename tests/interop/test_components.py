"""Component mappings against the reference implementations (diffusers / transformers, random weights):
tiny models numerically (max |Δ| ≤ 1e-5, fp32), SD-1.5/2.1-shaped models key for key and shape for shape on meta."""

from __future__ import annotations

import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmkit.interop.text import clip_model_cfg_from_hf, complete_clip_state, hf_text_config, text_state_from_hf, text_state_to_hf  # noqa: E402
from ldmkit.interop.unet import diffusers_unet_config, unet_config_from_diffusers, unet_state_to_diffusers  # noqa: E402
from ldmkit.interop.vae import (  # noqa: E402
    InteropError, autoencoder_config_from_diffusers, autoencoder_state_from_diffusers, autoencoder_state_to_diffusers,
    diffusers_autoencoder_config,
)
from ldmkit.nn.autoencoder import AutoencoderKL  # noqa: E402
from ldmkit.nn.unet import UNet, state_dict_from_diffusers  # noqa: E402

TOL = 1e-5
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD1_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
SD2_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _randomize(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, std)
    return module.eval()


# ---------------------------------------------------------------- VAE

def test_vae_tiny_encode_decode_match_diffusers() -> None:
    ref = _randomize(diffusers.AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2), 0.1)
    ours = AutoencoderKL(autoencoder_config_from_diffusers(ref.config)).eval()
    ours.load_state_dict(autoencoder_state_from_diffusers(ref.state_dict()), strict=True)
    for amplitude in (1.0, 1e-2):  # small inputs make GroupNorm's eps (SD's VAE: 1e-6) matter: 1e-5 fails here
        x, z = amplitude * torch.randn(2, 3, 16, 16), amplitude * torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            want, got = ref.encode(x).latent_dist, ours.encode(x)
            assert (want.mean - got.mean).abs().max() <= TOL and (want.logvar - got.logvar).abs().max() <= TOL
            assert (ref.decode(z).sample - ours.decode(z)).abs().max() <= TOL
    back = autoencoder_state_to_diffusers(ours.state_dict())
    assert back.keys() == ref.state_dict().keys() and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_vae_sd_shaped_keys_and_shapes_on_meta() -> None:
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**SD_VAE)
        cfg = autoencoder_config_from_diffusers(ref.config)
        ours = AutoencoderKL(cfg)
    assert _shapes(autoencoder_state_from_diffusers(ref.state_dict())) == _shapes(ours.state_dict())
    assert _shapes(autoencoder_state_to_diffusers(ours.state_dict())) == _shapes(ref.state_dict())
    kwargs = diffusers_autoencoder_config(cfg)
    assert {k: ref.config[k] for k in kwargs if k != "sample_size"} == {k: v for k, v in kwargs.items() if k != "sample_size"}


def test_vae_refuses_non_sd_block_types() -> None:
    with pytest.raises(InteropError, match="DownEncoderBlock2D"):
        autoencoder_config_from_diffusers({"block_out_channels": [32], "down_block_types": ["Foo"], "up_block_types": ["Bar"]})


# ---------------------------------------------------------------- text encoder

def _tokenize(enc, prompts):
    return enc.tokenize(prompts)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_encoder_matches_transformers(family: str) -> None:
    """SD1: last hidden state (final LN); SD2: penultimate of a 3-layer tower with the final LN, as ldmkit's
    clip_skip=1 over the 2 layers kept (the layout diffusers stores) and clip_skip=2 over all 3."""
    from ldmkit.nn.clip import FrozenClipTextEncoder, build_clip, build_tokenizer

    act, pad = ("quick_gelu", 49407) if family == "sd1" else ("gelu", 0)
    hf_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                         num_attention_heads=4, hidden_act=act)
    ref = _randomize(transformers.CLIPTextModel(hf_cfg), 0.05)
    prompts = ["a photo of a cat", "An astronaut riding a horse on Mars, 4k", ""]
    layers = 3 if family == "sd1" else 2
    model_cfg = clip_model_cfg_from_hf(hf_cfg.to_dict(), pad_id=pad, layers=layers)
    clip = build_clip(model_cfg=model_cfg)
    clip.load_state_dict(complete_clip_state(text_state_from_hf(ref.state_dict(), layers=layers), model_cfg), strict=True)
    enc = FrozenClipTextEncoder(clip, build_tokenizer(clip), clip_skip=1)
    ids = _tokenize(enc, prompts)
    assert int(ids[0, 7]) == pad  # after "<sot> a photo of a cat <eot>": SD pads with eot (SD1) or "!" (SD2)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        want = out.last_hidden_state if family == "sd1" else ref.final_layer_norm(out.hidden_states[2])
        got, _ = enc(prompts)
    assert (want - got).abs().max() <= TOL
    if family == "sd2":  # the full 3-layer tower with clip_skip=2 is the same (SD2 single files hold all layers)
        full_cfg = clip_model_cfg_from_hf(hf_cfg.to_dict(), pad_id=pad)
        full = build_clip(model_cfg=full_cfg)
        full.load_state_dict(complete_clip_state(text_state_from_hf(ref.state_dict()), full_cfg), strict=True)
        with torch.no_grad():
            got2, _ = FrozenClipTextEncoder(full, build_tokenizer(full), clip_skip=2)(prompts)
        assert (want - got2).abs().max() <= TOL
    else:
        back = text_state_to_hf(clip.state_dict(), prefix="")
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items() if "position_ids" not in k)


def test_tokenizer_ids_match_transformers_clip_tokenizer(tmp_path) -> None:
    """open_clip's bundled BPE (what ldmkit tokenizes with) written as vocab.json/merges.txt and read by
    transformers' CLIPTokenizer gives the same ids, padding included."""
    from ldmkit.interop.tokenizer import write_tokenizer_folder
    from ldmkit.nn.clip import PaddedTokenizer
    import open_clip

    write_tokenizer_folder(tmp_path, pad_id=49407)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = PaddedTokenizer(open_clip.SimpleTokenizer(context_length=77), 49407)
    prompts = ["a photo of a cat", "An astronaut riding a horse on Mars, 4k, trending on artstation!!",
               "  Multiple   spaces\tand CAPS  ", "émoji 🐱 and ünïcödé", "x " * 100]
    want = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), want)


@pytest.mark.parametrize("pad_id", [49407, 0])
def test_tokenizer_folder_with_only_tokenizer_json(tmp_path, pad_id: int) -> None:
    """transformers >= 5 `save_pretrained` writes tokenizer.json without vocab.json/merges.txt: read the same."""
    from ldmkit.interop.tokenizer import pad_id_from_tokenizer_folder, write_tokenizer_folder

    write_tokenizer_folder(tmp_path / "slow", pad_id)
    transformers.CLIPTokenizerFast.from_pretrained(tmp_path / "slow").save_pretrained(tmp_path / "fast")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / name).unlink(missing_ok=True)
    assert pad_id_from_tokenizer_folder(tmp_path / "fast") == pad_id
    (tmp_path / "fast" / "tokenizer.json").unlink()
    with pytest.raises(InteropError, match="neither vocab.json nor tokenizer.json"):
        pad_id_from_tokenizer_folder(tmp_path / "fast")


def test_text_encoder_sd_shaped_keys_and_shapes_on_meta() -> None:
    from ldmkit.nn.clip import build_clip

    for spec in (SD1_TEXT, SD2_TEXT):
        cfg = transformers.CLIPTextConfig(vocab_size=49408, **spec)
        with torch.device("meta"):
            ref = transformers.CLIPTextModel(cfg)
        model_cfg = clip_model_cfg_from_hf(cfg.to_dict())
        ours = build_clip(model_cfg=model_cfg, device="meta").state_dict()
        mapped = text_state_from_hf(ref.state_dict())
        assert _shapes(mapped) == {k: v for k, v in _shapes(ours).items() if k in mapped}
        assert {k for k in ours if not k.startswith("visual.")} - set(mapped) == {"text_projection", "logit_scale"}
        back = hf_text_config(model_cfg)
        assert {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")} == \
            {k: back[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")}


# ---------------------------------------------------------------- UNet

@pytest.mark.parametrize("sd2", [False, True])
def test_unet_tiny_matches_diffusers_and_inverts(sd2: bool) -> None:
    ref = _randomize(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=[2, 4] if sd2 else 2, norm_num_groups=8, use_linear_projection=sd2, sample_size=8))
    cfg = unet_config_from_diffusers(ref.config)
    ours = UNet(cfg).eval()
    ours.load_state_dict(state_dict_from_diffusers(ref.state_dict()), strict=True)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert (ref(x, t, c).sample - ours(x, t, c)).abs().max() <= TOL
    back = unet_state_to_diffusers(ours.state_dict(), linear_projection=sd2)
    assert back.keys() == ref.state_dict().keys() and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("sd2", [False, True])
def test_unet_group_norm_eps_matches_sd(sd2: bool) -> None:
    """Small latents (std 0.01) make GroupNorm's eps visible: eps 1e-6 instead of SD's 1e-5 in the ResNets moves
    the output by ~6e-5 on this net; with the right eps the outputs are equal to rounding."""
    ref = _randomize(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=[2, 4] if sd2 else 2, norm_num_groups=8, use_linear_projection=sd2, sample_size=8))
    assert ref.config.norm_eps == 1e-5
    ours = UNet(unet_config_from_diffusers(ref.config)).eval()
    ours.load_state_dict(state_dict_from_diffusers(ref.state_dict()), strict=True)
    assert ours.config.norm_eps == 1e-5 and diffusers_unet_config(ours.config)["norm_eps"] == 1e-5  # import and export
    former = UNet(dataclasses.replace(ours.config, norm_eps=1e-6)).eval()  # what imports ran with before the field
    former.load_state_dict(ours.state_dict())
    x, t, c = 0.01 * torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = ref(x, t, c).sample
        assert (expected - ours(x, t, c)).abs().max() <= TOL < (expected - former(x, t, c)).abs().max()


@pytest.mark.parametrize("spec", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_unet_sd_shaped_keys_and_shapes_on_meta(spec) -> None:
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**spec)
        cfg = unet_config_from_diffusers(ref.config)
        ours = UNet(cfg)
        rebuilt = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg, linear_projection=bool(spec.get("use_linear_projection"))))
    assert _shapes(state_dict_from_diffusers(ref.state_dict())) == _shapes(ours.state_dict())
    linear = bool(spec.get("use_linear_projection"))
    assert _shapes(unet_state_to_diffusers(ours.state_dict(), linear_projection=linear)) == _shapes(ref.state_dict())
    assert _shapes(rebuilt.state_dict()) == _shapes(ref.state_dict())
    assert (cfg.num_heads, cfg.head_dim) == ((8, None) if spec is SD15_UNET else (None, 64))


def test_unet_refuses_sdxl_config() -> None:
    with pytest.raises(InteropError, match="SDXL is not supported yet"):
        unet_config_from_diffusers({"addition_embed_type": "text_time", "down_block_types": [], "up_block_types": []})
