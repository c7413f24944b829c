"""The frozen CLIP text tower that conditions the diffusion stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FrozenClipTextEncoder(nn.Module):
    """Frozen CLIP text tower: ``captions -> (per-token embeddings (B, L, D), pooled (B, E))``.

    ``clip_skip`` counts from the end like the txt2img parameter ``Clip skip``: 1 takes the last
    block's output, 2 the penultimate one (Stable Diffusion / A1111 convention); the final
    LayerNorm is applied to whichever layer is taken. ``pooled`` is always the model's own text
    embedding (last layer, pooled at the end token, projected; not L2-normalised), as SDXL uses.
    Holds only the text tower (the image tower is not part of this module's state); it shares the
    given model's text parameters and freezes them (pass a copy to keep training that model).
    """

    def __init__(self, model: nn.Module, tokenizer, clip_skip: int = 1) -> None:
        super().__init__()
        text = getattr(model, "text", None)
        if text is not None and not hasattr(text, "token_embedding"):
            raise ValueError(f"{type(text).__name__} text towers are not supported; use an open_clip architecture with its own text transformer.")
        tower = text if text is not None else model  # CustomTextCLIP keeps it under .text, CLIP flat
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", "argmax")
        self.eos_id = getattr(tower, "eos_id", None) or getattr(tower, "text_eos_id", None)
        if getattr(tower, "cls_emb", None) is not None:
            raise ValueError("Text towers with a CLS embedding (CoCa-style) are not supported by FrozenClipTextEncoder.")
        self.tokenizer = tokenizer
        layers = len(self.transformer.resblocks)
        if not 1 <= int(clip_skip) <= layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: this text encoder has {layers} layers, so use 1 (last layer) to {layers}.")
        self.clip_skip = int(clip_skip)
        self.context_length = int(self.positional_embedding.shape[0])
        self.context_dim = int(self.positional_embedding.shape[1])
        proj = self.text_projection
        self.pooled_dim = self.context_dim if proj is None else int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenClipTextEncoder:
        return super().train(False)  # frozen: a parent's .train() must not switch it back

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        return self.tokenizer(list(captions)).to(self.positional_embedding.device)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.encode_tokens(self.tokenize(captions))

    @property
    def vocab_size(self) -> int:
        return int(self.token_embedding.num_embeddings)

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """`tokens` (B, L) as `tokenize` makes them -> (per-token embeddings (B, L, D), pooled (B, E))."""
        tokens = tokens.to(self.positional_embedding.device)
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast) + self.positional_embedding.to(cast)  # (B, L, D)
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        take = len(self.transformer.resblocks) - self.clip_skip  # block index whose output is used
        hidden = x
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x, attn_mask=self.attn_mask)
            if i == take:
                hidden = x
        if not batch_first:
            x, hidden = x.transpose(0, 1), hidden.transpose(0, 1)
        tokens_emb = self.ln_final(hidden)  # (B, L, D)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)  # (B, D)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection  # (B, E)
        return tokens_emb, pooled
