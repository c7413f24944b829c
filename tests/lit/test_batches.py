"""Batch transfer of the LightningModules (`ldmkit.lit.batches`) and ClipModule's use of pre-made tokens."""

from __future__ import annotations

from functools import partial

import torch

from ldmkit.data.shapes import ShapesDataModule
from ldmkit.lit.batches import move_batch_tensors
from ldmkit.lit.clip import ClipModule
from ldmkit.nn.clip import build_clip

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def shapes_batch(size: int = 6) -> dict:
    dm = ShapesDataModule(batch_size=size, num_workers=0, resolution=16, train_size=size, val_size=2, test_size=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_only_top_level_tensors_move_and_the_rest_is_passed_through():
    batch = shapes_batch()
    batch["tokens"] = torch.zeros(6, 4, dtype=torch.long)
    moved = move_batch_tensors(batch, torch.device("meta"))
    assert moved.keys() == batch.keys()
    assert moved["image"].device.type == "meta" and moved["tokens"].device.type == "meta"
    assert moved["image"].shape == batch["image"].shape and moved["tokens"].dtype == torch.long
    assert moved["caption"] is batch["caption"] and moved["attributes"] is batch["attributes"]
    assert batch["image"].device.type == "cpu"  # the input batch is not modified


def test_clip_module_uses_pre_made_tokens_and_transfers_with_the_helper():
    torch.manual_seed(0)
    module = ClipModule(build_clip(model_cfg=TINY_CFG), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    batch = shapes_batch()
    with torch.no_grad():
        from_captions = module.encode(batch)
        pre_made = module.encode({**batch, "tokens": module.tokenizer(batch["caption"])})
        # tokens win over captions when both are there: other tokens give other text features
        other = module.encode({**batch, "tokens": module.tokenizer(["a blue star"] * len(batch["caption"]))})
    torch.testing.assert_close(pre_made[0], from_captions[0])
    torch.testing.assert_close(pre_made[1], from_captions[1])
    assert not torch.allclose(other[1], from_captions[1])
    moved = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved["attributes"] is batch["attributes"] and torch.equal(moved["image"], batch["image"])
