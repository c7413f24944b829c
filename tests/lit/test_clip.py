"""ClipModule (`model=clip`): configs, optimizer groups + LR schedule, a short fit with validation
metrics, DDP-ordered gathering of validation rows, and the exported artifact round trip."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer

from ldmkit.artifacts import ArtifactError, save_artifact
from ldmkit.data.shapes import ShapesDataModule
from ldmkit.lit.clip import ClipModule, merge_rank_shards, shapes_zero_shot_task, zero_shot_task_for
from ldmkit.lit.optim import WarmupCosine, build_optimizer, warmup_cosine_schedule, weight_decay_param_groups
from ldmkit.nn.clip import FrozenClipTextEncoder, SigLipLoss, build_clip, encode_images, load_clip, load_text_encoder

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


def tiny_module(**kwargs) -> ClipModule:
    torch.manual_seed(0)
    return ClipModule(
        build_clip(model_cfg=TINY_CFG),
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        scheduler=partial(warmup_cosine_schedule, warmup_steps=2),
        **kwargs,
    )


def tiny_shapes(val_size: int = 20) -> ShapesDataModule:
    return ShapesDataModule(batch_size=8, num_workers=0, resolution=16, train_size=64, val_size=val_size, test_size=8)


def quiet_trainer(**kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return Trainer(**{**options, **kwargs})


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["clip", "clip_siglip", "clip_vit_b32"])
def test_model_configs_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"model={name}", "data=shapes"])
    module = instantiate(cfg.model)
    assert isinstance(module, ClipModule)
    tokens = module.tokenizer(["a red circle"])
    if name == "clip_vit_b32":
        assert module.net.ldmkit_arch["model_name"] == "ViT-B-32" and module.net.visual.image_size == (224, 224)
        assert tokens.shape == (1, 77) and module.loss.local_loss
        return
    assert module.net.visual.image_size == (cfg.data.resolution,) * 2 and tokens.shape == (1, 32)
    if name == "clip_siglip":
        assert isinstance(module.loss, SigLipLoss) and module.net.logit_bias is not None
        assert module.net.logit_bias.item() == -10.0 and module.net.logit_scale.exp().item() == pytest.approx(10.0)


# ------------------------------------------------------------------------------------------ optimizer


def test_weight_decay_only_on_weight_matrices():
    net = build_clip(model_cfg=TINY_CFG)
    groups = weight_decay_param_groups(net)
    names = {id(p): n for n, p in net.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]  # decay group: optimizer default
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())
    for name in ["logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding", "visual.positional_embedding",
                 "ln_final.weight", "ln_final.bias", "visual.ln_pre.weight", "transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.mlp.c_fc.bias"]:
        assert name in no_decay, name
    for name in ["text_projection", "visual.proj", "visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_proj.weight"]:
        assert name in decay, name


def test_fused_adamw_only_for_cuda_parameters():
    groups = weight_decay_param_groups(torch.nn.Linear(2, 2))
    assert build_optimizer(partial(torch.optim.AdamW, lr=1e-3), groups, "cuda").defaults["fused"] is True
    assert not build_optimizer(partial(torch.optim.AdamW, lr=1e-3), groups, "cpu").defaults["fused"]
    assert build_optimizer(partial(torch.optim.AdamW, lr=1e-3, fused=False), groups, "cuda").defaults["fused"] is False


def test_warmup_cosine_schedule_values():
    fn = WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert fn(14) == pytest.approx(0.1) and fn(100) == pytest.approx(0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=14, warmup_steps=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0 * fn(4), 2.0 * fn(5)])
    with pytest.raises(ValueError, match="finite total_steps"):
        warmup_cosine_schedule(optimizer, total_steps=math.inf)


# ------------------------------------------------------------------------------------------ training


def test_fit_logs_retrieval_and_zero_shot_metrics_and_clamps_temperature():
    module = tiny_module()
    with torch.no_grad():
        module.net.logit_scale.fill_(math.log(1000.0))  # above the clamp
    seen_by_callbacks = []

    class Record(Callback):  # where ModelCheckpoint saves: must already see the clamped value
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen_by_callbacks.append(pl_module.net.logit_scale.item())

    trainer = quiet_trainer(max_steps=3, val_check_interval=3, limit_val_batches=None, callbacks=[Record()])
    trainer.fit(module, datamodule=tiny_shapes())
    metrics = trainer.callback_metrics
    assert len(seen_by_callbacks) == 3 and max(seen_by_callbacks) <= math.log(100.0) + 1e-6
    assert module.net.logit_scale.item() <= math.log(100.0) + 1e-6
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.lr_lambdas[0].total_steps == 3
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == [0.1, 0.0]
    for key in ["train/loss", "val/loss", "val/i2t_R@1", "val/i2t_R@10", "val/t2i_R@5", "val/zeroshot_colour", "val/zeroshot_shape", "val/zeroshot_colour_shape"]:
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert 0 <= metrics["val/zeroshot_colour_shape"] <= min(metrics["val/zeroshot_colour"], metrics["val/zeroshot_shape"]) <= 1
    assert metrics["val/i2t_R@1"] <= metrics["val/i2t_R@5"] <= metrics["val/i2t_R@10"]


def test_bf16_grad_checkpointing_clipping_and_weights_only_checkpoint(tmp_path):
    module = tiny_module(grad_checkpointing=True, gradient_clip_val=0.5)
    assert module.net.transformer.grad_checkpointing and module.net.visual.transformer.grad_checkpointing
    clip_calls = []
    clip_gradients = module.clip_gradients
    module.clip_gradients = lambda optimizer, **kw: (clip_calls.append(kw), clip_gradients(optimizer, **kw))[1]
    before = module.net.visual.proj.detach().clone()
    trainer = quiet_trainer(max_steps=1, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_shapes())
    assert clip_calls == [{"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}]
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and not torch.equal(before, module.net.visual.proj)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # pipeline resumes with weights_only=True
    assert checkpoint["lr_schedulers"][0]["lr_lambdas"][0]["total_steps"] == 1


def test_zero_shot_task_is_picked_from_the_datamodule():
    from ldmkit.data.digits import DigitsDataModule

    assert zero_shot_task_for(tiny_shapes()).name == "shapes"
    digits = zero_shot_task_for(DigitsDataModule(batch_size=4, num_workers=0))
    assert digits.name == "digits" and digits.prompts()[7] == "a handwritten digit seven"
    assert digits.targets([{"digit": 7}, {}]).tolist() == [[7], [-1]]
    assert zero_shot_task_for(object()) is None and zero_shot_task_for(tiny_shapes(), None) is None
    assert zero_shot_task_for(None, "digits", "the digit {digit}").prompts()[0] == "the digit zero"
    with pytest.raises(ValueError, match="zero_shot='cifar'"):
        zero_shot_task_for(None, "cifar")


def test_shapes_zero_shot_task_uses_single_object_scenes():
    task = shapes_zero_shot_task()
    assert len(task.prompts()) == 36 and "a red circle" in task.prompts()
    one = {"objects": [{"shape": "star", "colour": "blue", "size": "small", "position": "left"}]}
    two = {"objects": [one["objects"][0], {"shape": "circle", "colour": "red", "size": "large", "position": "right"}]}
    targets = task.targets([one, two])
    assert task.prompts()[int((task.combinations() == targets[0]).all(1).nonzero())] == "a blue star"
    assert targets[1].tolist() == [-1, -1]


def test_merge_rank_shards_restores_dataset_order_and_drops_sampler_padding():
    from torch.utils.data import DistributedSampler

    data = torch.arange(7) * 10  # 7 rows over 2 ranks: DistributedSampler pads rank 1 with row 0
    shards = [torch.stack([data[i] for i in DistributedSampler(range(7), num_replicas=2, rank=r, shuffle=False)]) for r in range(2)]
    gathered, counts = torch.stack(shards), torch.tensor([4, 4])
    assert torch.equal(merge_rank_shards(gathered, counts, total=7), data)
    assert torch.equal(merge_rank_shards(gathered[:, :2], torch.tensor([2, 2]), total=7), data[:4])  # limit_val_batches prefix
    assert torch.equal(merge_rank_shards(torch.tensor([[0, 2, 4], [1, 3, -1]]), torch.tensor([3, 2])), torch.arange(5))


# ------------------------------------------------------------------------------------------ artifact


def test_export_load_round_trip_gives_identical_embeddings(tmp_path):
    module = tiny_module()
    # frozen like the loaded copy: nn.MultiheadAttention's inference fast path (taken only when no
    # parameter requires grad) rounds differently, and the comparison must be bit-exact
    module.net.eval().requires_grad_(False)
    folder = module.export_artifact(tmp_path / "artifact", datamodule=tiny_shapes())
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "clip" and config["context_length"] == 12 and config["text_width"] == 32 and config["embed_dim"] == 16
    assert config["image_size"] == 16 and config["trained"]["data"] == "shapes" and len(config["image_mean"]) == 3

    model, tokenizer, loaded_config = load_clip(folder)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    captions = ["a red circle", "a small blue star on the left", "two shapes: a green cross and a yellow diamond"]
    with torch.no_grad():
        torch.testing.assert_close(encode_images(model, images), encode_images(module.net, images), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(tokenizer(captions)), module.net.encode_text(module.tokenizer(captions)), rtol=0, atol=0)

    encoder = load_text_encoder(folder, clip_skip=2)
    reference = FrozenClipTextEncoder(module.net, module.tokenizer, clip_skip=2)
    for got, want in zip(encoder(captions), reference(captions)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (encoder.context_length, encoder.context_dim, encoder.pooled_dim) == (12, 32, 16)

    # weights.safetensors is a plain open_clip state dict: usable as a pretrained checkpoint
    again = build_clip(model_cfg=loaded_config["model_cfg"], pretrained_path=folder / "weights.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(encode_images(again, images), encode_images(module.net, images), rtol=0, atol=0)


def test_loading_errors_name_the_producing_command(tmp_path):
    with pytest.raises(ArtifactError, match="python train.py model=clip"):
        load_clip(tmp_path / "missing")
    save_artifact(tmp_path / "vae", "autoencoder", {"w": torch.zeros(1)}, {})
    with pytest.raises(ArtifactError, match="'autoencoder' artifact.*'clip' artifact is needed.*python train.py model=clip"):
        load_text_encoder(tmp_path / "vae")
    with pytest.raises(ArtifactError, match="does not exist.*python train.py model=clip"):
        load_clip(tmp_path / "open_clip_model.bin", model_name="ViT-B-32")
    torch.save(build_clip(model_cfg=TINY_CFG).state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="model_name"):
        load_clip(tmp_path / "ckpt.pt")


# ------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.environ["TEST_DIR"])
    from lightning.pytorch.strategies import DDPStrategy
    from test_clip import quiet_trainer, tiny_module, tiny_shapes

    module = tiny_module()
    widths = []
    gather = module.gather_features
    module.gather_features = lambda x: (lambda y: (widths.append([x.shape[0], y.shape[0]]), y)[1])(gather(x))
    trainer = quiet_trainer(strategy=DDPStrategy(process_group_backend="gloo", start_method="popen"), devices=2, max_steps=1,
                            limit_val_batches=None, val_check_interval=1)
    trainer.validate(module, datamodule=tiny_shapes(val_size=13))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and k != "val/loss"}
    trainer.fit(module, datamodule=tiny_shapes(val_size=13))
    if trainer.global_rank == 0:
        json.dump({"metrics": metrics, "widths": widths}, open(os.environ["OUT"], "w"))
    """
)


@pytest.mark.slow
def test_ddp_validation_metrics_equal_one_process(tmp_path):
    """2 gloo ranks, 13 val samples (uneven: the sampler pads one): same recall/zero-shot as 1 process,
    and the training step contrasts against both ranks' features."""
    here = os.path.dirname(__file__)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    out = tmp_path / "ddp.json"
    env = {**os.environ, "TEST_DIR": here, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "ddp.py")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads(out.read_text())
    assert ddp["widths"] and all(total == 2 * local for local, total in ddp["widths"])

    trainer = quiet_trainer(limit_val_batches=None)
    trainer.validate(tiny_module(), datamodule=tiny_shapes(val_size=13))
    assert set(ddp["metrics"]) >= {"val/i2t_R@1", "val/zeroshot_colour_shape"}
    for key, value in ddp["metrics"].items():
        assert value == pytest.approx(float(trainer.callback_metrics[key]), abs=1e-6), key
