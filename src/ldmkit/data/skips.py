"""Counting samples that were skipped instead of crashing training.

What is counted (per reason, see `SKIP_REASONS`):

- ``decode_error``: image bytes / file that PIL cannot decode (garbage, truncated, unsupported).
- ``missing_image``: a shard sample with no ``jpg``/``jpeg``/``png``/``webp`` member.
- ``shard_error``: a shard that could not be opened or read to the end (missing file, garbage tar,
  a tar cut inside a member, inside a header or between two members: a complete tar ends with
  its end-of-archive block, see `ldmkit.data.shard_reader`), counted once per read of that shard.
  The samples after the failure point are lost and are *not* counted individually (their number
  is unknown); the last sample before a cut may lack its .txt/.json.
- ``missing_caption``: a sample with no caption (no / empty ``.txt`` and no caption in its
  ``.json``; an image-folder file with no / empty caption and no ``data.default_caption``),
  skipped under ``data.missing_caption=skip`` (the default).
- ``too_small`` / ``bad_aspect``: samples removed by the optional ``min_size`` /
  ``max_aspect_ratio`` filters (not errors, but reported so a filter that eats everything is visible).
- ``unreadable_file``: an image-folder file that cannot be opened at all (permissions, vanished).
- ``kept_without_caption``: not a skip: a sample with no caption that was *kept* and trained on
  the empty caption because ``data.missing_caption=empty``; counted so that unconditional
  training on them is visible, but left out of ``total`` (which counts dropped samples).

Counts are events: a map-style dataset (imagefolder) counts a broken file each time its index is
requested, i.e. once per epoch; a resampled stream counts a broken shard each time it is drawn.

Counts live in a small shared-memory tensor with one row per DataLoader worker (row 0: the main
process), so the training process can read the totals of all its workers without any
synchronisation and without two processes ever writing the same cell. Under DDP each rank has its
own counter; the logged values are per rank (sum them across ranks for the global figure).
Each worker also logs a warning with the sample key, the reason and its running count (the first
`warn_first` skips, then at powers of two, so a broken dataset cannot flood the log).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "decode_error", "missing_image", "shard_error", "too_small", "bad_aspect", "unreadable_file", "missing_caption",
    "kept_without_caption",
)
KEPT_REASONS = ("kept_without_caption",)  # counted, but the sample was used: not in ``total``
MISSING_CAPTION_POLICIES = ("skip", "empty", "error")
MAX_WORKER_SLOTS = 64


class SkipCounter:
    """Per-reason counts of skipped samples, aggregated over DataLoader workers of this process."""

    def __init__(self, name: str = "data", warn_first: int = 5) -> None:
        self.name = name
        self.warn_first = warn_first
        # (1 + workers, reasons); shared memory so worker processes' increments are visible here.
        self.counts = torch.zeros(1 + MAX_WORKER_SLOTS, len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    @staticmethod
    def _slot() -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % MAX_WORKER_SLOTS

    def add(self, reason: str, key: str = "?", error: BaseException | str | None = None) -> None:
        """Count one skipped sample (call from wherever the sample was dropped, any worker)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; one of {SKIP_REASONS}")
        info = get_worker_info()
        slot = self._slot()
        self.counts[slot, SKIP_REASONS.index(reason)] += 1
        in_slot = int(self.counts[slot].sum())
        if in_slot <= self.warn_first or (in_slot & (in_slot - 1)) == 0:
            where = "main process" if info is None else f"worker {info.id}"
            detail = f": {str(error)[:200]}" if error else ""
            verb = "kept sample" if reason in KEPT_REASONS else "skipped sample"
            log.warning(
                "%s: %s %r (%s%s); %d counted so far in %s",
                self.name, verb, key, reason, detail, in_slot, where,
            )

    def totals(self) -> dict[str, int]:
        """Counts per reason over all workers of this process, plus ``total``."""
        totals = dict(zip(SKIP_REASONS, self.counts.sum(dim=0).tolist()))
        totals["total"] = sum(v for k, v in totals.items() if k not in KEPT_REASONS)
        return totals

    def dropped_here(self, exclude: tuple[str, ...] = ()) -> int:
        """Samples dropped by the calling worker (or the main process), without the `exclude` reasons."""
        row = dict(zip(SKIP_REASONS, self.counts[self._slot()].tolist()))
        return sum(v for k, v in row.items() if k not in KEPT_REASONS and k not in exclude)

    def total(self) -> int:
        """Samples dropped (the kept reasons left out)."""
        return self.totals()["total"]

    def reset(self) -> None:
        self.counts.zero_()

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.totals().items() if v}
        return f"SkipCounter({self.name!r}, {nonzero})"


class MissingCaptionError(ValueError):
    """A sample without a caption under ``data.missing_caption=error``."""


def check_missing_caption_policy(policy: str, source: str) -> str:
    if policy not in MISSING_CAPTION_POLICIES:
        raise ValueError(
            f"{source}: data.missing_caption must be one of {MISSING_CAPTION_POLICIES}, got {policy!r} "
            "(skip: drop and count samples without a caption; empty: train on them with the caption \"\"; "
            "error: stop at the first one)"
        )
    return policy


def missing_caption_error(source: str, key: str) -> MissingCaptionError:
    return MissingCaptionError(
        f"{source}: sample {key!r} has no caption and data.missing_caption=error. Give it a caption, or set "
        "data.missing_caption=skip (drop and count such samples) or data.missing_caption=empty (train on them "
        'with the caption "", i.e. unconditionally)'
    )
