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


def insert_random_tokens(tokens: Tensor, prob: float, max_tokens: int, vocab_size: int, eot_id: int,
                         generator: torch.Generator, protected: Sequence[int] = ()) -> Tensor:
    """Caption noise for contrastive training: with probability `prob` a caption gets 1..`max_tokens` token ids,
    uniform over the vocabulary, inserted at uniformly drawn places between its start and end tokens.

    A tiny CLIP trained on a closed caption set (`shapes`: 85 distinct tokens) never sees most of its vocabulary,
    and how a new word in a prompt ("an image showing one red star") moves the other words' token states, which
    the LDM cross-attends to, is then a matter of the seed. Random insertions teach the text tower that words
    outside the caption's content carry nothing (as word dropout / token-replacement noise do for text models).
    `tokens` (B, L) as the tokenizer returns them (start, ids, end, then padding); the end token's first
    occurrence ends a caption. Insertions that would not fit in L are dropped (the end token stays). Ids in
    `protected` (start/end/padding) are never inserted. Runs on the CPU; returns a new tensor on `tokens`' device.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"text noise prob must be in [0, 1], got {prob!r}")
    if int(max_tokens) < 1:
        raise ValueError(f"text noise max_tokens must be a positive integer, got {max_tokens!r}")
    if prob == 0.0:
        return tokens
    rows = tokens.detach().cpu()
    out = rows.clone()
    batch, length = rows.shape
    chosen = torch.rand(batch, generator=generator) < prob
    counts = torch.randint(1, int(max_tokens) + 1, (batch,), generator=generator)
    protected_ids = torch.tensor(sorted({int(p) for p in protected} | {int(eot_id)}), dtype=rows.dtype)
    for b in torch.nonzero(chosen).flatten().tolist():
        ends = torch.nonzero(rows[b] == eot_id).flatten()
        if len(ends) == 0:
            continue
        n = int(ends[0]) + 1  # start .. end, inclusive
        k = min(int(counts[b]), length - n)
        if k <= 0:
            continue
        ids = torch.randint(0, vocab_size, (k,), generator=generator, dtype=rows.dtype)
        while (bad := torch.isin(ids, protected_ids)).any():
            ids[bad] = torch.randint(0, vocab_size, (int(bad.sum()),), generator=generator, dtype=rows.dtype)
        slots = torch.randint(1, n, (k,), generator=generator).sort().values  # before the token at this index
        content = rows[b, :n].tolist()
        for j, (slot, token) in enumerate(zip(slots.tolist(), ids.tolist())):
            content.insert(slot + j, token)
        out[b, : n + k] = torch.tensor(content, dtype=rows.dtype)
    return out.to(tokens.device)


class TextNoise:
    """Caption noise as a training option (`insert_random_tokens`), with the option checks in one place and a
    generator seeded by (run seed, rank, step), so a run and its resumption draw the same noise.

    `prob`: share of captions that get random token ids inserted (0 = off); `max_tokens`: 1..this many per caption.
    `field` names the config option in error messages (e.g. ``model.text_noise``)."""

    def __init__(self, prob: float = 0.0, max_tokens: int = 3, field: str = "text_noise") -> None:
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"{field}_prob must be a number in [0, 1] (the share of training captions that get "
                             f"random tokens inserted; 0 turns it off), got {prob!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{field}_max_tokens must be a positive integer (at most this many random tokens per "
                             f"chosen caption), got {max_tokens!r}")
        self.prob, self.max_tokens = float(prob), int(max_tokens)
        self.seed = torch.initial_seed()  # seed_everything's seed when the run built its module

    def __bool__(self) -> bool:
        return self.prob > 0.0

    def __call__(self, tokens: Tensor, tokenizer: Any, vocab_size: int, rank: int, step: int) -> Tensor:
        """`tokens` (B, L) from `tokenizer` (open_clip's: start/end/padding ids are never inserted)."""
        if not self:
            return tokens
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1))
        special = [getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "pad_id", 0), 0]
        return insert_random_tokens(tokens, self.prob, self.max_tokens, int(vocab_size), int(tokenizer.eot_token_id),
                                    generator, [t for t in special if t is not None])
