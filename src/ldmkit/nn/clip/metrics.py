"""CLIP evaluation: image/text retrieval recall and zero-shot classification by prompts."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def caption_ids(captions: Sequence[str]) -> Tensor:
    """Stable int64 id per caption string (equal captions, equal ids) that can be all-gathered."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little", signed=True) for c in captions], dtype=torch.long)


def _recall_one_way(queries: Tensor, candidates: Tensor, query_ids: Tensor, cand_ids: Tensor, ks: Sequence[int], chunk: int) -> dict[int, Tensor]:
    hits = {k: torch.zeros((), device=queries.device) for k in ks}
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ candidates.T  # (q, N)
        positive = query_ids[start : start + chunk, None] == cand_ids[None, :]
        best_positive = sims.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)
        better = (sims > best_positive).sum(dim=1)  # candidates ranked strictly above the best match
        for k in ks:
            hits[k] = hits[k] + (better < k).sum()
    return {k: v / queries.shape[0] for k, v in hits.items()}


def retrieval_recall(image_features: Tensor, text_features: Tensor, ids: Tensor | None = None, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, Tensor]:
    """Image→text and text→image recall@k over N pairs (row i of both is one pair).

    A retrieved item counts as correct if its caption equals the query's (``ids`` from
    ``caption_ids``; None: only the paired item), so duplicate captions in synthetic data do not
    turn ties into arbitrary misses. Ties rank in the query's favour: the result does not depend
    on the order of samples, which keeps single- and multi-process evaluation equal.
    """
    n = image_features.shape[0]
    ids = torch.arange(n, device=image_features.device) if ids is None else ids.to(image_features.device)
    i2t = _recall_one_way(image_features, text_features, ids, ids, ks, chunk)
    t2i = _recall_one_way(text_features, image_features, ids, ids, ks, chunk)
    out = {f"i2t_R@{k}": v for k, v in i2t.items()}
    out.update({f"t2i_R@{k}": v for k, v in t2i.items()})
    return out


@dataclass
class ZeroShotTask:
    """Zero-shot classification by prompts: one prompt per combination of attribute values.

    ``classes`` maps attribute name → values, ``template`` formats a combination into a prompt
    (e.g. ``"a {colour} {shape}"``), ``target(attributes) -> {name: value} | None`` reads a
    sample's true values (None: not applicable, e.g. several objects in the image).
    """

    name: str
    template: str
    classes: dict[str, list[Any]]
    target: Callable[[dict[str, Any]], dict[str, Any] | None]
    keys: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = list(self.classes)

    def combinations(self) -> Tensor:
        """(P, K) value indices of every prompt, in ``prompts()`` order."""
        return torch.tensor(list(itertools.product(*(range(len(v)) for v in self.classes.values()))), dtype=torch.long)

    def prompts(self) -> list[str]:
        return [self.template.format(**dict(zip(self.keys, values))) for values in itertools.product(*self.classes.values())]

    def targets(self, attributes: Sequence[dict[str, Any]]) -> Tensor:
        """(B, K) true value indices per sample, -1 where not applicable."""
        rows = []
        for attrs in attributes:
            truth = self.target(attrs or {})
            try:
                rows.append([self.classes[k].index(truth[k]) for k in self.keys] if truth is not None else [-1] * len(self.keys))
            except (KeyError, ValueError):
                rows.append([-1] * len(self.keys))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(self.keys))


def zero_shot_accuracy(image_features: Tensor, prompt_features: Tensor, combinations: Tensor, targets: Tensor, keys: Sequence[str]) -> dict[str, Tensor]:
    """Accuracy per attribute and for all at once (``"_".join(keys)``) of the best-scoring prompt.

    image_features (N, E) and prompt_features (P, E) L2-normalised; combinations (P, K); targets (N, K)
    with -1 rows ignored. Returns an empty dict if no sample is applicable.
    """
    valid = (targets >= 0).all(dim=1)
    if not bool(valid.any()):
        return {}
    best = (image_features[valid] @ prompt_features.T).argmax(dim=1)  # (n,)
    predicted = combinations.to(best.device)[best]  # (n, K)
    correct = predicted == targets[valid].to(best.device)  # (n, K)
    out = {key: correct[:, i].float().mean() for i, key in enumerate(keys)}
    if len(keys) > 1:
        out["_".join(keys)] = correct.all(dim=1).float().mean()
    return out
