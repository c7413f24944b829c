"""The one error type of `python eval.py` configs (kept apart so every eval module can raise it)."""

from __future__ import annotations


class EvalConfigError(ValueError):
    """An eval config cannot run; the message says what was wrong and what to change."""
