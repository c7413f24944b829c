"""Prompt accuracy: how often the attributes a held-out caption asks for are read back from its sample by
an attribute judge trained on the data's own ground truth (`ldmkit.eval.attributes`). The data says what
can be judged through its `attribute_task()` hook; on other data the metric is n/a."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.intervals import interval_of
from ldmkit.eval.metrics.base import Column, EvalContext, Metric, Row, SampledBatch, pct

MODES = ("auto", "required")


def accuracy_column(key: str, field: str = "prompt_accuracy", header: str | None = None) -> Column:
    """A rate `row[field][key]` with its 95% Wilson interval from `row[field + "_counts"][key] = [k, n]`,
    shown as "90.0% [82.4–94.6]"; the best row is the highest rate."""
    def value(row: Row) -> float | None:
        accuracy = row.get(field)
        return accuracy.get(key) if isinstance(accuracy, Mapping) else None

    def interval(row: Row) -> tuple[float, float] | None:
        return interval_of(row, f"{field}_counts", key)

    def cell(row: Row) -> str:
        text, ci = pct(value(row)), interval(row)
        return text if text == "n/a" or ci is None else f"{text} [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"

    return Column(header or f"{key} acc ↑", cell, best="max", spec=".3f", value=value, interval=interval)


class PromptAccuracy(Metric):
    name = "prompt_accuracy"
    row = {"prompt_accuracy": None, "prompt_accuracy_counts": None, "judged_prompts": 0}
    columns = tuple(accuracy_column(key) for key in ("colour", "shape", "both"))

    def __init__(self, mode: str = "auto", judge_steps: int = 300):
        if mode not in MODES:
            raise EvalConfigError(f"metrics.prompt_accuracy.mode={mode!r}: use auto (on where the data has an "
                                  "attribute judge) or required (fail where it has none).")
        self.mode, self.judge_steps = mode, int(judge_steps)
        self.task: dict[str, Any] | None = None
        self.judge = None

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> PromptAccuracy:
        return cls(mode="required")  # asked for by name: say so when the data cannot be judged

    @classmethod
    def off_note(cls) -> str:
        return "Prompt accuracy: n/a (needs data=shapes held-out captions)."

    def check(self, context: EvalContext) -> bool:
        hook = getattr(context.datamodule, "attribute_task", None)
        possible = hook is not None and context.file_prompts is None and context.height == context.width
        if not possible:
            if self.mode == "auto":
                return False
            raise EvalConfigError(
                "metrics.prompt_accuracy needs data with an attribute judge (data=shapes) and its own held-out "
                "captions (they carry the attributes the judge checks) and square samples; use "
                "metrics.prompt_accuracy.mode=auto or metrics.prompt_accuracy=false."
            )
        self.task = hook()
        return True

    def setup(self, context: EvalContext) -> None:
        from ldmkit.eval.attributes import load_attribute_classifier

        self.judge = load_attribute_classifier(context.cache_dir / "judge", context.height, self.judge_steps,
                                               task=self.task).to(context.device)

    def update(self, batch: SampledBatch) -> tuple[Counter, Counter, int]:
        from ldmkit.eval.clip_score import PromptAccuracy as Accuracy

        judged = [k for k, target in enumerate(batch.targets) if self.task["judges"](target)]
        accuracy = Accuracy(self.judge.predict, self.task["judged_fields"])
        if judged:
            accuracy.update(batch.images[judged], [batch.targets[k] for k in judged])
        return accuracy.correct, accuracy.total, len(judged)

    def merge(self, partials: Sequence[tuple[Counter, Counter, int]]) -> dict[str, Any]:
        from ldmkit.eval.clip_score import PromptAccuracy as Accuracy

        accuracy = Accuracy(attributes=self.task["judged_fields"])
        for correct, total, _ in partials:
            accuracy.correct.update(correct)
            accuracy.total.update(total)
        judged = sum(n for _, _, n in partials)
        counts = {key: [accuracy.correct[key], accuracy.total[key]] for key in (*self.task["judged_fields"], "both")}
        return {"prompt_accuracy": accuracy.compute() if judged else None,
                "prompt_accuracy_counts": counts if judged else None, "judged_prompts": judged}

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        judged = rows[0].get("judged_prompts", 0) if rows else 0
        task = self.task
        return (f"Prompt accuracy: {' and '.join(task['judged_fields'])} read back by the {task['name']} attribute "
                f"classifier (ldmkit.eval.attributes), judged on the {judged} {task['judged_prompts']} prompts of "
                f"{context.num_samples}; {task['unjudged_prompts']}. [low–high]: 95% Wilson interval, each judged "
                "object one Bernoulli trial.")
