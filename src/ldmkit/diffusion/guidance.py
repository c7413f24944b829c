"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the raw network.

    guided = uncond + scale · (cond - uncond)

is applied to the raw output. Every parameterisation is affine in the output with coefficients that
depend only on (x_t, t), so this equals guiding x̂_0 or ε̂ directly: eps-, v- and x0-models guide alike.

Guidance rescale (Lin et al. 2023, §3.4 / Alg. 2) matches the per-sample std of the guided prediction
to the conditional one and blends with weight φ = `rescale`. Unlike the combination above, the std is
not invariant under the parameterisation change, so the space matters: we rescale in x̂_0 space by
default (`rescale_space="x0"`; the quantity whose over-exposure the paper fixes, and identical for eps-
and v-models), and offer "v" (the paper's v-model outputs, ComfyUI's choice) and "eps".
Rescaling needs (α, σ) at the network's t, from the noise process, and the parameterisation:
`ldmkit.diffusion.sample` supplies both when handed the wrapper; called standalone, pass `process=`
(or its former name `schedule=`) and `prediction=`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from ldmkit.diffusion.parameterization import check_prediction, convert
from ldmkit.diffusion.processes import NoiseProcess


def _batch_size(tree: Any) -> int | None:
    if isinstance(tree, Tensor):
        return tree.shape[0]
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    for child in children:
        size = _batch_size(child)
        if size is not None:
            return size
    return None


def expand_batch(tree: Any, batch: int) -> Any:
    """Broadcast every tensor leaf with batch size 1 to `batch` (e.g. one shared empty-prompt embedding)."""
    if isinstance(tree, Tensor):
        return tree.expand(batch, *tree.shape[1:]) if tree.shape[0] == 1 and batch != 1 else tree
    if isinstance(tree, dict):
        return {k: expand_batch(v, batch) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(expand_batch(v, batch) for v in tree)
    return tree


def concat_batch(first: Any, second: Any) -> Any:
    """Concatenate two pytrees of tensors (tensor / tuple / list / dict / None leaves) along dim 0."""
    if isinstance(first, Tensor):
        if not isinstance(second, Tensor) or first.shape[1:] != second.shape[1:]:
            raise ValueError(
                f"cond and uncond must have the same structure and per-sample shapes; got {tuple(first.shape)} "
                f"and {tuple(second.shape) if isinstance(second, Tensor) else type(second).__name__}."
            )
        return torch.cat([first, second])
    if isinstance(first, dict):
        if not isinstance(second, dict) or first.keys() != second.keys():
            raise ValueError(f"cond and uncond dicts need the same keys, got {sorted(first)} and {sorted(second or {})}.")
        return {k: concat_batch(first[k], second[k]) for k in first}
    if isinstance(first, (list, tuple)):
        if not isinstance(second, (list, tuple)) or len(first) != len(second):
            raise ValueError("cond and uncond sequences need the same length and structure.")
        return type(first)(concat_batch(a, b) for a, b in zip(first, second))
    if first != second:
        raise ValueError(f"non-tensor conditioning leaves must match between cond and uncond, got {first!r} and {second!r}.")
    return first


@dataclass
class ClassifierFreeGuidance:
    """`model_fn(x_t, t)` that runs `model(x_t, t, cond)` and `model(x_t, t, uncond)` as one batch of 2B."""

    model: Callable[[Tensor, Tensor, Any], Tensor]
    cond: Any
    uncond: Any
    scale: float
    rescale: float = 0.0
    process: NoiseProcess | None = None
    prediction: str | None = None
    rescale_space: str = "x0"

    def __post_init__(self) -> None:
        check_prediction(self.rescale_space)
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance rescale φ must be in [0, 1], got {self.rescale}.")

    def bind(self, process: NoiseProcess, prediction: str) -> "ClassifierFreeGuidance":
        """A copy that knows the noise process and parameterisation (what `sample` does for you)."""
        return replace(self, process=self.process or process, prediction=self.prediction or prediction)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        batch = x_t.shape[0]
        if self.scale == 1.0:
            return self.model(x_t, t, expand_batch(self.cond, batch))
        cond = concat_batch(expand_batch(self.cond, batch), expand_batch(self.uncond, batch))
        out_cond, out_uncond = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), cond).chunk(2)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale > 0:
            guided = self._rescale(guided, out_cond, x_t, t)
        return guided

    def _rescale(self, guided: Tensor, positive: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.process is None or self.prediction is None:
            raise ValueError(
                "guidance rescale needs the schedule (noise process) and the model's prediction type: pass the guided "
                "model to ldmkit.diffusion.sample(...), or build it with classifier_free_guidance(..., process=, prediction=)."
            )
        level = self.process.path(self.process.from_model_time(t))  # (α, σ) at the network's t, (B,)
        space, src = self.rescale_space, self.prediction
        guided_s = convert(guided, x_t, level, src, space)
        positive_s = convert(positive, x_t, level, src, space)
        dims = tuple(range(1, guided.ndim))
        factor = positive_s.std(dim=dims, keepdim=True) / guided_s.std(dim=dims, keepdim=True).clamp(min=1e-12)
        blended = self.rescale * guided_s * factor + (1 - self.rescale) * guided_s
        return convert(blended, x_t, level, space, src)


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    cond: Any,
    uncond: Any,
    scale: float,
    *,
    rescale: float = 0.0,
    process: NoiseProcess | None = None,
    prediction: str | None = None,
    rescale_space: str = "x0",
    schedule: NoiseProcess | None = None,
) -> ClassifierFreeGuidance:
    """Wrap `model(x_t, t, cond)` into `model_fn(x_t, t)` with classifier-free guidance.

    `cond`/`uncond`: tensors (B, ...) or pytrees (tuple/list/dict) of them; uncond leaves of batch 1 are
    broadcast (negative prompts are just another `uncond`). One forward of 2B per call; `scale == 1`
    runs the conditional pass only. `rescale` is φ of Lin et al. 2023 (0 disables)."""
    return ClassifierFreeGuidance(model, cond, uncond, float(scale), float(rescale), process or schedule, prediction,
                                  rescale_space)
