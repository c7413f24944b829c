"""open_clip's BPE tokenizer for a CLIP model (the vocabulary ships inside open_clip: works offline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.nn.clip.factory import clip_arch


def build_tokenizer(model: nn.Module | None = None, model_name: str | None = None, context_length: int | None = None):
    """open_clip's tokenizer for a model (BPE vocab shipped inside open_clip: works offline).

    Returns a callable ``tokenizer(list[str]) -> LongTensor (B, context_length)``; captions longer
    than the context are truncated, keeping start token + first L-2 BPE tokens + end token.
    """
    import open_clip

    pad_id = 0
    if model is not None:
        arch = clip_arch(model)
        model_name = arch["model_name"]
        text_cfg = arch["model_cfg"]["text_cfg"]
        context_length = context_length or text_cfg.get("context_length", 77)
        pad_id = int((text_cfg.get("tokenizer_kwargs") or {}).get("pad_id", 0))
    if model_name:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length or 77)
    return PaddedTokenizer(tokenizer, pad_id) if pad_id else tokenizer


class PaddedTokenizer:
    """open_clip's BPE tokenizer padding with `pad_id` after the end token instead of 0: SD 1.x's text
    encoder sees its padding positions as end tokens (49407), and the UNet attends to all 77 of them."""

    def __init__(self, tokenizer: Any, pad_id: int) -> None:
        self.tokenizer, self.pad_id = tokenizer, int(pad_id)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        ids = self.tokenizer(texts, context_length)  # (B, L), zeros after the end token
        seen_end = (ids == self.tokenizer.eot_token_id).long().cumsum(dim=1)
        after_end = torch.cat([torch.zeros_like(seen_end[:, :1]), seen_end[:, :-1]], dim=1) > 0
        return ids.masked_fill(after_end, self.pad_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)
