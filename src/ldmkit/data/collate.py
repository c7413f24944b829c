"""One batch format for every datamodule (docs/CONVENTIONS.md)."""

from __future__ import annotations

from typing import Any

import torch


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, keep captions and attribute dicts as lists; extra tensor keys are stacked."""
    if not samples:
        raise ValueError("collate_samples got an empty list of samples")
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W) in [-1, 1]
        "caption": [s.get("caption", "") for s in samples],
        "attributes": [s.get("attributes", {}) for s in samples],
    }
    for key in samples[0].keys() - batch.keys():
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
