"""An objective judge of prompt-following: a small CNN that reads an image's attributes (on `shapes`:
shape, colour, size and position), trained on the data generator's own ground truth.

The data says what is judged through its `attribute_task()` hook (fields and their values, a
training set, which prompts can be judged); `shapes` is the one that has it today.

It never sees the diffusion model or CLIP, so "did the image follow the prompt" is measured
against the dataset's attributes rather than by the model that conditioned the generation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ldmkit.data.shapes import ShapesDataModule

log = logging.getLogger(__name__)
SHAPES_TASK = ShapesDataModule.attribute_task()
FIELDS: dict[str, Sequence[str]] = SHAPES_TASK["fields"]


class AttributeClassifier(nn.Module):
    """(B, 3, R, R) in [-1, 1] → one logit vector per attribute field of the (single) object."""

    def __init__(self, width: int = 32, fields: Mapping[str, Sequence[str]] = FIELDS) -> None:
        super().__init__()
        self.fields = {name: tuple(values) for name, values in fields.items()}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width), block(width, width), nn.MaxPool2d(2),
            block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 4w·16)
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width * 16, len(values)) for name, values in self.fields.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict]:
        """Attribute dicts in the dataset's format: [{"objects": [{"shape", "colour", "size", "position"}]}]."""
        logits = self(images)
        picks = {name: logits[name].argmax(1).tolist() for name in self.fields}
        return [{"objects": [{name: values[picks[name][i]] for name, values in self.fields.items()}]}
                for i in range(images.shape[0])]


def _targets(attributes: Sequence[dict], fields: Mapping[str, Sequence[str]] = FIELDS) -> dict[str, torch.Tensor]:
    objects = [a["objects"][0] for a in attributes]
    return {name: torch.tensor([list(values).index(o[name]) for o in objects]) for name, values in fields.items()}


def train_attribute_classifier(resolution: int = 32, steps: int = 300, batch_size: int = 64, seed: int = 0,
                               task: Mapping[str, Any] = SHAPES_TASK) -> AttributeClassifier:
    """Fit on the task's single-object train images (a split the judge shares with nothing it scores)."""
    torch.manual_seed(seed)
    data = task["training_set"](resolution, steps * batch_size, seed + 7919)
    fields = task["fields"]
    model = AttributeClassifier(fields=fields)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        batch = data.__getitems__(range(step * batch_size, (step + 1) * batch_size))
        images = torch.stack([b["image"] for b in batch])
        targets = _targets([b["attributes"] for b in batch], fields)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in fields)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def attribute_accuracy(model: AttributeClassifier, images: torch.Tensor, attributes: Sequence[dict]) -> dict[str, float]:
    """Per-field accuracy plus colour+shape jointly, against the objects' true attributes."""
    logits = model(images)
    targets = _targets(attributes, model.fields)
    correct = {name: logits[name].argmax(1) == targets[name] for name in model.fields}
    out = {name: float(c.float().mean()) for name, c in correct.items()}
    out["colour+shape"] = float((correct["colour"] & correct["shape"]).float().mean())
    return out


def load_attribute_classifier(cache_dir: str | Path, resolution: int = 32, steps: int = 300,
                              task: Mapping[str, Any] = SHAPES_TASK) -> AttributeClassifier:
    """The task's judge for `resolution`, trained once and cached as safetensors in `cache_dir`."""
    path = Path(cache_dir) / f"{task['name']}_attribute_classifier_r{resolution}_s{steps}.safetensors"
    model = AttributeClassifier(fields=task["fields"])
    if path.is_file():
        log.info("reusing %s", path)
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    start = time.perf_counter()
    model = train_attribute_classifier(resolution, steps, task=task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    log.info("trained the %s attribute classifier in %.0f s → %s", task["name"], time.perf_counter() - start, path)
    return model
