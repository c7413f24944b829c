"""Import (diffusers folder, single file) and export (diffusers folder, single file) of tiny SD 1.x/2.x models:
round trips through diffusers' own loaders (offline) are bit-identical; bad input fails clearly, writing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from ldmkit.interop.convert import main  # noqa: E402
from ldmkit.interop.sd_export import export_diffusers, export_single_file  # noqa: E402
from ldmkit.interop.sd_import import import_checkpoint  # noqa: E402
from ldmkit.interop.vae import InteropError  # noqa: E402
from ldmkit.nn.weights_file import UntrustedWeightsError  # noqa: E402


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _artifact_tensors(paths: dict[str, Path]) -> dict[str, dict]:
    return {k: load_file(str(p / "weights.safetensors")) for k, p in paths.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_import_export_round_trips(family: str, sd_folders, tmp_path) -> None:
    src = sd_folders[family]
    ref = diffusers.StableDiffusionPipeline.from_pretrained(src, local_files_only=True)
    paths = import_checkpoint(src, tmp_path / "imported")
    ldm = json.loads((paths["ldm"] / "config.json").read_text())
    assert ldm["process"]["prediction"] == ("v" if family == "sd2" else "eps") and ldm["format_version"] == 2
    ac = load_file(str(paths["ldm"] / "weights.safetensors"))["process.alphas_cumprod"]
    assert torch.allclose(ac.float(), ref.scheduler.alphas_cumprod, atol=1e-7)
    assert json.loads((paths["autoencoder"] / "config.json").read_text())["scale_factor"] == 0.18215

    exported = export_diffusers(paths["ldm"], tmp_path / "diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert _same(getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()), name
    assert pipe.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
    assert torch.equal(pipe.scheduler.alphas_cumprod, ref.scheduler.alphas_cumprod)
    assert pipe.tokenizer.pad_token_id == ref.tokenizer.pad_token_id

    single = export_single_file(paths["ldm"], tmp_path / "model.safetensors")
    keys = load_file(str(single)).keys()
    text_prefix = "cond_stage_model.model." if family == "sd2" else "cond_stage_model.transformer.text_model."
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith(text_prefix) for k in keys) and "model.diffusion_model.input_blocks.0.0.weight" in keys
    # diffusers' own single-file conversion (configs from the exported folder: no download) gives the same weights
    from_single = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(exported), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert _same(getattr(ref, name).state_dict(), getattr(from_single, name).state_dict()), name
    again = import_checkpoint(single, tmp_path / "reimported")
    assert all(_same(a, b) for a, b in zip(_artifact_tensors(paths).values(), _artifact_tensors(again).values()))


@pytest.mark.slow
def test_cli_import_refuses_existing_target_and_overwrite_keeps_foreign_files(sd_folders, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["import", str(sd_folders["sd1"]), f"out={out}"]) == 0
    before = (out / "ldm" / "weights.safetensors").read_bytes()
    assert main(["import", str(sd_folders["sd1"]), f"out={out}"]) == 2
    assert "already exists" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(["import", str(sd_folders["sd1"]), f"out={out}", "overwrite=true"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "ldm" / "weights.safetensors").read_bytes() == before
    assert main(["export", str(out / "ldm"), f"out={tmp_path / 'x.ckpt'}", "format=single_file"]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["import", str(sd_folders["sd1"]), "out"]) == 2  # not key=value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind


def _nothing_written(tmp_path: Path, keep: set[str]) -> bool:
    return {p.name for p in tmp_path.iterdir()} == keep


@pytest.mark.slow
def test_missing_component_and_mismatched_latent_channels(sd_folders, tmp_path) -> None:
    broken = shutil.copytree(sd_folders["sd1"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(InteropError, match=r"missing vae/.*or pass the model's single-file checkpoint"):
        import_checkpoint(broken, tmp_path / "out")
    diffusers.AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, latent_channels=8, norm_num_groups=32,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2).save_pretrained(broken / "vae")
    with pytest.raises(InteropError, match="8 latent channels but the UNet takes 4"):
        import_checkpoint(broken, tmp_path / "out")
    assert _nothing_written(tmp_path, {"broken"})


@pytest.mark.parametrize(("pipeline", "components", "message"), [
    ("StableDiffusionXLPipeline", ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"],
     r"a StableDiffusionXLPipeline \(SDXL\): SDXL is not supported yet; Stable Diffusion 1.x .* and 2.x"),
    ("StableDiffusion3Pipeline", ["transformer", "vae", "text_encoder", "text_encoder_3", "scheduler"], "SD3 is not supported yet"),
    ("FluxPipeline", ["transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"], "Flux is not supported yet"),
    ("StableDiffusionInpaintPipeline", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
     "a StableDiffusionInpaintPipeline, which is not supported yet"),
])
def test_other_pipeline_folders_are_named(pipeline, components, message, tmp_path) -> None:
    folder = tmp_path / "model"
    for name in components:
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(InteropError, match=message):
        import_checkpoint(folder, tmp_path / "out")
    assert _nothing_written(tmp_path, {"model"})


def _single_file(keys: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(keys, str(path))
    return path


@pytest.mark.parametrize(("keys", "message"), [
    ({"conditioner.embedders.0.transformer.x": 1, "model.diffusion_model.input_blocks.0.0.weight": 1}, "SDXL is not supported yet"),
    ({"model.diffusion_model.joint_blocks.0.x": 1}, "SD3 is not supported yet"),
    ({"double_blocks.0.img_attn.qkv.weight": 1}, "Flux is not supported yet"),
    ({"encoder.layer.0.weight": 1}, "not a Stable Diffusion checkpoint"),
])
def test_unknown_families_are_named(keys, message, tmp_path) -> None:
    path = _single_file({k: torch.zeros(v) for k, v in keys.items()}, tmp_path / "m.safetensors")
    with pytest.raises(InteropError, match=message):
        import_checkpoint(path, tmp_path / "out")
    assert _nothing_written(tmp_path, {"m.safetensors"})


@pytest.mark.slow
def test_foreign_keys_and_code_pickles_are_refused(sd_folders, tmp_path) -> None:
    paths = import_checkpoint(sd_folders["sd1"], tmp_path / "imp")
    single = export_single_file(paths["ldm"], tmp_path / "m.safetensors")
    tensors = load_file(str(single))
    tensors["lora_unet_down_blocks_0.alpha"] = torch.ones(())
    with pytest.raises(InteropError, match="belong to no Stable Diffusion component"):
        import_checkpoint(_single_file(tensors, tmp_path / "foreign.safetensors"), tmp_path / "out")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "hook": Exploit()}, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedWeightsError, match="refused on purpose"):
        import_checkpoint(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Exploit:
    """Stands for a checkpoint object whose unpickling would run code."""


@pytest.mark.slow
def test_export_refuses_transformer_backbones_and_existing_targets(sd_folders, tmp_path) -> None:
    paths = import_checkpoint(sd_folders["sd1"], tmp_path / "imp")
    target = tmp_path / "exported"
    target.mkdir()
    with pytest.raises(InteropError, match="already exists"):
        export_diffusers(paths["ldm"], target)
    config_path = paths["ldm"] / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"]["arch"] = "dit"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InteropError, match="dit backbone"):
        export_diffusers(paths["ldm"], tmp_path / "new")
    config["backbone"]["arch"] = "unet"
    config["text_encoder_options"]["context"] = "pooled"  # a UNet that attends to the pooled embedding: not SD's
    config_path.write_text(json.dumps(config))
    with pytest.raises(InteropError, match="text_context='pooled'.*Only text_context=tokens models export"):
        export_diffusers(paths["ldm"], tmp_path / "new")
    assert not (tmp_path / "new").exists() and list(target.iterdir()) == []


@pytest.mark.slow
def test_export_overwrite_replaces_only_its_files_and_a_failed_export_writes_nothing(sd_folders, tmp_path, monkeypatch) -> None:
    import ldmkit.interop.sd_export as sd_export

    paths = import_checkpoint(sd_folders["sd1"], tmp_path / "imp")
    target = tmp_path / "exported"
    (target / "unet").mkdir(parents=True)
    (target / "README.md").write_text("mine")
    (target / "unet" / "notes.txt").write_text("mine too")
    (target / "model_index.json").write_text("stale")
    export_diffusers(paths["ldm"], target, overwrite=True)
    assert (target / "README.md").read_text() == "mine" and (target / "unet" / "notes.txt").read_text() == "mine too"
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert diffusers.StableDiffusionPipeline.from_pretrained(target, local_files_only=True).unet.config.in_channels == 4

    single = tmp_path / "model.safetensors"
    single.write_bytes(b"not mine")
    with pytest.raises(InteropError, match="already exists"):
        export_single_file(paths["ldm"], single)
    assert single.read_bytes() == b"not mine"
    export_single_file(paths["ldm"], single, overwrite=True)
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(str(single))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sd_export, "write_tokenizer_folder", fail)  # a failure half-way through the folder
    before = sorted((p.relative_to(target), p.read_bytes()) for p in target.rglob("*") if p.is_file())
    for out, overwrite in ((tmp_path / "new", False), (target, True)):
        with pytest.raises(OSError, match="disk full"):
            export_diffusers(paths["ldm"], out, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert sorted((p.relative_to(target), p.read_bytes()) for p in target.rglob("*") if p.is_file()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "imp", "model.safetensors"]  # no temporary folders


@pytest.mark.slow
def test_fp16_folder_imports_as_float32(sd_folders, tmp_path) -> None:
    """fp16 files (the hub's fp16 variants) are upcast while writing, one tensor at a time: the artifacts hold float32
    equal to the fp16 values, the same tensors as importing the fp32 folder rounded to fp16."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folders["sd1"], local_files_only=True)
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16")
    assert load_file(str(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"].dtype == torch.float16
    half, full = (_artifact_tensors(import_checkpoint(src, tmp_path / name))
                  for src, name in ((tmp_path / "fp16", "from_fp16"), (sd_folders["sd1"], "from_fp32")))
    for kind in ("autoencoder", "text_encoder", "ldm"):
        assert half[kind].keys() == full[kind].keys()
        for key, value in full[kind].items():
            want = value if key == "process.alphas_cumprod" or not value.is_floating_point() or kind == "text_encoder" and \
                key.startswith(("visual.", "text_projection", "logit_scale")) else value.half().float()
            assert half[kind][key].dtype == value.dtype and torch.equal(half[kind][key], want), (kind, key)
