"""ldmkit.nn.clip: losses (vs direct formulas, open_clip and a 2-process gloo run), factory,
pretrained loading, tokenizer truncation, frozen text encoder (clip skip), retrieval/zero-shot metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldmkit.nn.clip import (
    ClipCheckpointError,
    ClipLoss,
    FrozenClipTextEncoder,
    SigLipLoss,
    ZeroShotTask,
    build_clip,
    build_tokenizer,
    caption_ids,
    encode_images,
    retrieval_recall,
    zero_shot_accuracy,
)

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_clip(model_cfg=TINY_CFG).eval()
    return model, build_tokenizer(model)


def _features(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1), F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)


# ------------------------------------------------------------------------------------------ losses


def test_clip_loss_matches_direct_computation_and_open_clip():
    import open_clip

    images, texts = _features(6)
    scale = torch.tensor(7.5, dtype=torch.float64)
    direct = []
    for i in range(6):  # Radford et al. 2021, Fig. 3: symmetric cross-entropy over cosine similarities
        i2t = -math.log(math.exp(scale * images[i] @ texts[i]) / sum(math.exp(scale * images[i] @ texts[j]) for j in range(6)))
        t2i = -math.log(math.exp(scale * texts[i] @ images[i]) / sum(math.exp(scale * texts[i] @ images[j]) for j in range(6)))
        direct.append((i2t + t2i) / 2)
    per_sample = ClipLoss()(images, texts, scale)
    assert per_sample.shape == (6,)
    torch.testing.assert_close(per_sample, torch.tensor(direct, dtype=torch.float64))
    torch.testing.assert_close(per_sample.mean(), open_clip.loss.ClipLoss()(images, texts, scale))


def test_siglip_loss_matches_direct_computation_and_open_clip():
    import open_clip

    images, texts = _features(5, seed=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    direct = [
        -sum(math.log(1 / (1 + math.exp(-(1 if i == j else -1) * (scale * images[i] @ texts[j] + bias)))) for j in range(5))
        for i in range(5)
    ]
    per_row = SigLipLoss()(images, texts, scale, bias)
    torch.testing.assert_close(per_row, torch.tensor(direct, dtype=torch.float64))
    torch.testing.assert_close(per_row.mean(), open_clip.loss.SigLipLoss()(images, texts, scale, bias))
    with pytest.raises(ValueError, match="init_logit_bias"):
        SigLipLoss()(images, texts, scale, None)


@pytest.mark.parametrize("loss", [ClipLoss(local_loss=True), ClipLoss(local_loss=False), SigLipLoss(local_loss=True), SigLipLoss(local_loss=False)])
def test_sharded_loss_averages_to_the_full_batch_loss(loss):
    """What each DDP rank computes (its rows vs all gathered columns), averaged, is the 1-process loss."""
    images, texts = _features(8, seed=2)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    full = loss(images, texts, scale, bias).mean()
    per_rank = [loss(images[r * 4 : (r + 1) * 4], texts[r * 4 : (r + 1) * 4], scale, bias, all_image_features=images, all_text_features=texts, rank=r).mean() for r in range(2)]
    torch.testing.assert_close(torch.stack(per_rank).mean(), full)


DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys, torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_clip_ddp_common import LOSSES, Towers, batch

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["PG_FILE"], rank=rank, world_size=2)
    from ldmkit.nn.clip import gather_with_grad

    images, tokens = batch()
    local = slice(rank * 4, (rank + 1) * 4)
    results = {}
    for name, loss_fn in LOSSES.items():
        model = DistributedDataParallel(Towers())
        image_features, text_features, scale, bias = model(images[local], tokens[local])
        loss = loss_fn(image_features, text_features, scale, bias, all_image_features=gather_with_grad(image_features),
                       all_text_features=gather_with_grad(text_features), rank=rank).mean()
        loss.backward()  # DDP averages gradients over the 2 ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[name] = {"loss": mean_loss.item() / 2, "grads": {n: p.grad.tolist() for n, p in model.module.named_parameters()}}
    if rank == 0:
        with open(os.environ["OUT"], "w") as f:
            json.dump(results, f)
    # Tear down in step: drop the last DDP module (its reducer holds the group) and wait for the other rank
    # before destroying the group. Without this, gloo sometimes aborted one process at exit ("terminate called
    # without an active exception", ~1 run in 6) after both had finished their work.
    del model, loss, image_features, text_features
    dist.barrier()
    dist.destroy_process_group()
    """
)

DDP_COMMON = textwrap.dedent(
    """
    import torch
    from torch import nn
    from ldmkit.nn.clip import ClipLoss, SigLipLoss

    LOSSES = {"clip": ClipLoss(local_loss=False), "clip_local": ClipLoss(local_loss=True), "siglip": SigLipLoss(local_loss=True)}

    class Towers(nn.Module):
        # stand-in image/text towers: the property under test is the loss + gather + DDP averaging
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.image = nn.Linear(6, 5)
            self.text = nn.Embedding(11, 5)
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.logit_bias = nn.Parameter(torch.tensor(-1.0))

        def forward(self, images, tokens):
            img = nn.functional.normalize(self.image(images), dim=-1)
            txt = nn.functional.normalize(self.text(tokens).mean(1), dim=-1)
            return img, txt, self.logit_scale.exp(), self.logit_bias

    def batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(8, 6, generator=g), torch.randint(0, 11, (8, 3), generator=g)
    """
)


def test_ddp_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    (tmp_path / "test_clip_ddp_common.py").write_text(DDP_COMMON)
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    out = tmp_path / "ddp.json"
    env = {**os.environ, "TEST_DIR": str(tmp_path), "PG_FILE": str(tmp_path / "pg"), "OUT": str(out), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py")], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    ddp = json.loads(out.read_text())

    sys.path.insert(0, str(tmp_path))
    try:
        from test_clip_ddp_common import LOSSES, Towers, batch
    finally:
        sys.path.remove(str(tmp_path))
    images, tokens = batch()
    for name, loss_fn in LOSSES.items():
        model = Towers()
        loss = loss_fn(*model(images, tokens)).mean()
        loss.backward()
        assert ddp[name]["loss"] == pytest.approx(loss.item(), rel=1e-5), name
        for pname, param in model.named_parameters():
            torch.testing.assert_close(torch.tensor(ddp[name]["grads"][pname]), param.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: grad of {pname}")


# ------------------------------------------------------------------------------------------ factory


def test_build_clip_inline_and_by_name():
    model = build_clip(model_cfg=TINY_CFG, image_size=24, context_length=10)
    assert model.visual.image_size == (24, 24) and model.context_length == 10
    assert model.ldmkit_arch["model_cfg"]["text_cfg"]["context_length"] == 10
    big = build_clip(model_name="ViT-B-32", device="meta")  # no allocation: shape checks only
    assert big.text_projection.shape == (512, 512) and big.visual.conv1.weight.shape == (768, 3, 32, 32)
    assert big.ldmkit_arch["model_name"] == "ViT-B-32"
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        build_clip(model_name="ViT-Q-99")
    with pytest.raises(ValueError, match="exactly one of"):
        build_clip()


def test_pretrained_checkpoint_loads_and_mismatches_fail_clearly(tmp_path, tiny):
    from safetensors.torch import save_file

    model, _ = tiny
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    for name in ("ckpt.pt", "ckpt.safetensors"):
        loaded = build_clip(model_cfg=TINY_CFG, pretrained_path=tmp_path / name)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)

    with pytest.raises(ClipCheckpointError, match="does not exist.*open_clip checkpoint file"):
        build_clip(model_cfg=TINY_CFG, pretrained_path=tmp_path / "missing.pt")
    wider = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "width": 48, "heads": 3}}
    with pytest.raises(ClipCheckpointError, match=r"does not match the architecture given by model_cfg: \d+ shape mismatches \(e.g. positional_embedding: checkpoint \(12, 32\) vs model \(12, 48\)"):
        build_clip(model_cfg=wider, pretrained_path=tmp_path / "ckpt.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ClipCheckpointError, match="Cannot read pretrained checkpoint"):
        build_clip(model_cfg=TINY_CFG, pretrained_path=tmp_path / "garbage.pt")


def test_tokenizer_truncates_at_the_context_length(tiny):
    model, tokenizer = tiny
    long = "a small red circle on the left and a large blue square on the right on a dark background"
    tokens = tokenizer([long, "a red circle"])
    assert tokens.shape == (2, 12) and tokens.dtype == torch.long
    assert tokens[0, 0] == SOT and tokens[0, -1] == EOT and (tokens[0] != 0).all()  # cut, end token kept
    assert tokens[1, 0] == SOT and (tokens[1] == EOT).sum() == 1 and tokens[1, -1] == 0  # padded
    assert torch.equal(tokens[0, 1:-1], build_tokenizer(context_length=77)([long])[0, 1:11])  # first L-2 BPE tokens
    features = model.encode_text(tokens)  # argmax pooling still finds the end token
    assert features.shape == (2, 16) and torch.isfinite(features).all()


def test_encode_images_normalises_minus1_1_and_resizes(tiny):
    model, _ = tiny
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected_input = F.interpolate(images, size=(16, 16), mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected = F.normalize(model.encode_image(((expected_input + 1) / 2 - mean) / std), dim=-1)
    torch.testing.assert_close(encode_images(model, images), expected)


# ------------------------------------------------------------------------------------------ text encoder


def test_frozen_text_encoder_clip_skip(tiny):
    model, tokenizer = tiny
    captions = ["a red circle", "a large blue star at the top"]
    tokens = tokenizer(captions)
    last = FrozenClipTextEncoder(model, tokenizer, clip_skip=1)
    emb, pooled = last(captions)
    assert (last.context_length, last.context_dim, last.pooled_dim) == (12, 32, 16)
    assert emb.shape == (2, 12, 32) and pooled.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(pooled, model.encode_text(tokens))  # pooled = the CLIP text embedding
        reference = model.forward_intermediates(text=tokens, text_indices=[1, 2], normalize_intermediates=True, intermediates_only=True)["text_intermediates"]
    torch.testing.assert_close(emb, reference[1])  # clip_skip=1: last block + final LayerNorm
    emb2, pooled2 = FrozenClipTextEncoder(model, tokenizer, clip_skip=2)(captions)
    torch.testing.assert_close(emb2, reference[0])  # clip_skip=2: penultimate block + final LayerNorm
    assert not torch.allclose(emb2, emb)
    torch.testing.assert_close(pooled2, pooled)  # pooled does not depend on clip_skip

    assert not any(p.requires_grad for p in last.parameters())
    assert not any(n.startswith("visual") for n, _ in last.named_parameters())  # text tower only
    assert not last.train().training
    with pytest.raises(ValueError, match="clip_skip=4 is out of range.*3 layers"):
        FrozenClipTextEncoder(model, tokenizer, clip_skip=4)


# ------------------------------------------------------------------------------------------ metrics


def test_retrieval_recall_matches_brute_force_and_counts_duplicate_captions():
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    texts = F.normalize(images + 0.9 * torch.randn(30, 8, generator=g), dim=-1)
    metrics = retrieval_recall(images, texts, ks=(1, 5, 10), chunk=7)
    sims = images @ texts.T
    for k in (1, 5, 10):
        i2t = sum(i in sims[i].topk(k).indices.tolist() for i in range(30)) / 30
        t2i = sum(i in sims[:, i].topk(k).indices.tolist() for i in range(30)) / 30
        assert metrics[f"i2t_R@{k}"].item() == pytest.approx(i2t) and metrics[f"t2i_R@{k}"].item() == pytest.approx(t2i)
    assert 0 < metrics["i2t_R@1"] < metrics["i2t_R@10"] <= 1

    # two images with the same caption: either caption row counts as a hit for either image
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ids = caption_ids(["a red circle", "a red circle", "a blue star"])
    assert ids[0] == ids[1] != ids[2]
    assert retrieval_recall(images, texts, ids, ks=(1,))["i2t_R@1"] == 1.0
    assert retrieval_recall(images, texts, None, ks=(1,))["i2t_R@1"] == pytest.approx(1 / 3)


def test_zero_shot_task_and_accuracy():
    task = ZeroShotTask("toy", "a {colour} {shape}", {"colour": ["red", "blue"], "shape": ["circle", "star"]}, lambda a: a.get("obj"))
    assert task.prompts() == ["a red circle", "a red star", "a blue circle", "a blue star"]
    targets = task.targets([{"obj": {"colour": "blue", "shape": "star"}}, {}, {"obj": {"colour": "red", "shape": "star"}}, {"obj": {"colour": "red", "shape": "hexagon"}}])
    assert targets.tolist() == [[1, 1], [-1, -1], [0, 1], [-1, -1]]
    prompts = torch.eye(4)
    images = torch.stack([prompts[3], prompts[0], prompts[2], prompts[1]])  # predicts: blue star, -, blue circle, -
    accuracy = zero_shot_accuracy(images, prompts, task.combinations(), targets, task.keys)
    assert accuracy["colour"] == 0.5 and accuracy["shape"] == 0.5 and accuracy["colour_shape"] == 0.5
    assert zero_shot_accuracy(images, prompts, task.combinations(), torch.full((4, 2), -1), task.keys) == {}
