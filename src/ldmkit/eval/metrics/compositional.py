"""The compositional prompt suite (GenEval-style, on `shapes`): counting, colour binding, position and size
accuracy, each with a Wilson 95% interval, read back by the object judge (`ldmkit.eval.objects`). The suite's
prompts (`ldmkit.data.shapes.suite`) are the metric's own: drawn with every setting after the run's prompt set,
scored by this metric alone, with a report grid per category. On data without the suite hook it is n/a."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ldmkit.data.shapes.suite import CATEGORIES
from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics.base import Column, EvalContext, Metric, OwnPrompts, Row, SampledBatch, missing
from ldmkit.eval.checks import check_seeds

MODES = ("auto", "required")


def field(category: str, suffix: str = "") -> str:
    return f"comp_{category}{suffix}"


def category_column(category: str) -> Column:
    def cell(row: Row) -> str:
        rate, low, high = (row.get(field(category, s)) for s in ("", "_lo", "_hi"))
        if missing(rate):
            return "n/a"
        return f"{100 * rate:.1f}% [{100 * low:.1f}–{100 * high:.1f}]"  # as prompt accuracy's cells

    def interval(row: Row) -> tuple[float, float] | None:
        low, high = row.get(field(category, "_lo")), row.get(field(category, "_hi"))
        return None if missing(low) or missing(high) else (float(low), float(high))

    # key + interval: plotted against NFE with error bars, best bold, `≈` where the best lies in a row's interval
    return Column(f"{category} acc ↑ [95% CI]", cell, key=field(category), best="max", spec=".3f", interval=interval)


class CompositionalSuite(Metric):
    name = "compositional"
    row = {f: None for c in CATEGORIES for f in (field(c), field(c, "_lo"), field(c, "_hi"), field(c, "_n"))}
    row |= {field("binding", "_swapped"): None}
    columns = tuple(category_column(c) for c in CATEGORIES)

    def __init__(self, mode: str = "auto", per_category: int = 64, seed: int = 0, grid_prompts: int = 8,
                 judge_steps: int = 300, categories: Sequence[str] = CATEGORIES):
        if mode not in MODES:
            raise EvalConfigError(f"metrics.compositional.mode={mode!r}: use auto (on where the data has the suite) "
                                  "or required (fail where it has none).")
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            raise EvalConfigError(f"metrics.compositional.categories={list(categories)!r}: pick from "
                                  f"{list(CATEGORIES)}.")
        if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
            raise EvalConfigError(f"metrics.compositional.per_category must be a whole number >= 1, got "
                                  f"{per_category!r}.")
        self.mode, self.per_category, self.grid_prompts = mode, per_category, max(0, int(grid_prompts))
        self.seed = check_seeds("metrics.compositional.seed", seed, len(categories) * per_category)
        self.judge_steps, self.categories = int(judge_steps), tuple(categories)
        self.suite: dict[str, Any] | None = None
        self.task: dict[str, Any] | None = None
        self.judge = None
        self.on_real: dict[str, dict[str, int]] = {}
        self.ceiling: dict[str, tuple[int, int]] | str = "not measured"

    @classmethod
    def switched_on(cls, root: Mapping[str, Any]) -> CompositionalSuite:
        return cls(mode="required")

    @classmethod
    def off_note(cls) -> str | None:
        return "Compositional suite: n/a (needs data=shapes without prompts_file, and square samples)."

    def check(self, context: EvalContext) -> bool:
        dm = context.datamodule
        possible = (hasattr(dm, "compositional_suite") and hasattr(dm, "attribute_task")
                    and context.file_prompts is None and context.height == context.width)
        if not possible:
            if self.mode == "auto":
                return False
            raise EvalConfigError(
                "metrics.compositional needs data=shapes (the data's compositional suite) without prompts_file, and "
                f"square samples (got data={context.data_name}, prompts_file="
                f"{'set' if context.file_prompts else 'none'}, {context.width}x{context.height}); use "
                "metrics.compositional.mode=auto or metrics.compositional=false."
            )
        self.suite, self.task = dm.compositional_suite(), dm.attribute_task()
        return True

    def items(self) -> list[tuple[str, dict]]:
        return self.suite["prompts"](self.per_category, self.seed, self.categories)

    def own_prompts(self, context: EvalContext) -> OwnPrompts:
        items = self.items()
        grids = {c: [k for k, (_, t) in enumerate(items) if t["category"] == c][: self.grid_prompts]
                 for c in self.categories} if self.grid_prompts else {}
        return OwnPrompts([p for p, _ in items], [self.seed + k for k in range(len(items))], [t for _, t in items],
                          source=f"the {self.suite['name']} compositional suite", grids=grids)

    def setup(self, context: EvalContext) -> None:
        from ldmkit.eval.attributes import load_attribute_classifier
        from ldmkit.eval.compositional import judge_accuracy_on_real
        from ldmkit.eval.objects import ObjectJudge

        classifier = load_attribute_classifier(context.cache_dir / "judge", context.height, self.judge_steps,
                                               task=self.task).to(context.device)
        self.judge = ObjectJudge(classifier, self.task["palette"], self.task["anchors"])
        # the judge's own accuracy, on real renders of this run's prompts (and of their counterparts)
        self.on_real = judge_accuracy_on_real(self.judge.read, self.suite, [t for _, t in self.items()],
                                              context.height, seed=self.seed + 7919)
        self.ceiling = self.autoencoder_ceiling(context)

    def autoencoder_ceiling(self, context: EvalContext) -> dict[str, tuple[int, int]] | str:
        """Per category (accepted, followed) on the same real images after an encode-decode round trip through
        the (first) model's autoencoder: roughly the most a model that draws through it can score (a small
        star the autoencoder returns as a blob is not a star). A message instead when it cannot be loaded."""
        from ldmkit.eval.compositional import judge_accuracy_on_real
        from ldmkit.nn.autoencoder import load_autoencoder, round_trip

        path = context.ldm_config.get("autoencoder")
        try:
            autoencoder = load_autoencoder(path, device=context.device)[0]
        except Exception as err:  # e.g. an imported model's VAE: the ceiling is context, not the metric
            return f"not measured (the autoencoder {path!r} did not load: {type(err).__name__}: {err})"

        counts = judge_accuracy_on_real(lambda images: self.judge.read(round_trip(autoencoder, images)), self.suite,
                                        [t for _, t in self.items()], context.height, seed=self.seed + 7919)
        return {c: (k["accepted"], k["followed"]) for c, k in counts.items()}

    def update(self, batch: SampledBatch) -> Counter:
        from ldmkit.eval.compositional import verdict

        counts: Counter = Counter()
        for target, found in zip(batch.targets, self.judge.read(batch.images)):
            counts[(target["category"], verdict(target, found, self.suite["checked"]))] += 1
        return counts

    def merge(self, partials: Sequence[Counter]) -> dict[str, Any]:
        from ldmkit.eval.compositional import CORRECT, SWAPPED
        from ldmkit.eval.intervals import wilson_interval

        counts = sum(partials, Counter())
        out: dict[str, Any] = {}
        for category in self.categories:
            n = sum(v for (c, _), v in counts.items() if c == category)
            correct = counts[(category, CORRECT)]
            low, high = wilson_interval(correct, n) if n else (None, None)
            out |= {field(category): correct / n if n else None, field(category, "_lo"): low,
                    field(category, "_hi"): high, field(category, "_n"): n}
        n = out.get(field("binding", "_n"))
        if n:
            out[field("binding", "_swapped")] = counts[("binding", SWAPPED)] / n
        return out

    def note(self, context: EvalContext, rows: Sequence[Row]) -> str:
        from ldmkit.eval.compositional import judge_accuracy

        judge = "; ".join(
            f"{c} {100 * judge_accuracy(k):.1f}% (accepts {k['accepted']}/{k['followed']} that follow, rejects "
            f"{k['rejected']}/{k['violated']} that do not)" for c, k in self.on_real.items() if c in self.categories)
        ceiling = self.ceiling if isinstance(self.ceiling, str) else ", ".join(
            f"{c} {100 * a / n:.1f}%" for c, (a, n) in self.ceiling.items() if c in self.categories and n)
        grids = " ".join(f"{c} grid: " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)) + "."
                         for c, prompts in self.grid_prompt_texts().items())
        return (
            f"Compositional suite: {self.per_category} prompts per category ({', '.join(self.categories)}), from a "
            f"held-out frame ('{self.suite['frame']} ...') no training caption uses; suite sample k is seeded "
            f"{self.seed} + k in every setting and scored by this metric alone. Objects are found by chroma and hue "
            "(count, colour, position) and read by the attribute classifier (shape, size); a sample is correct when "
            "the objects found equal the prompt's in what its category checks (counting: shapes; binding: colour-"
            "shape pairs, a swap is wrong; position: shape and place; size: shape and size); an extra or missing "
            "object is wrong. Brackets: Wilson 95% intervals. The judge's own accuracy on real rendered images for "
            f"and against these prompts: {judge}. The same images that follow the prompts, encoded and decoded by the "
            f"model's own autoencoder (the first model's, in a run of several), are judged correct: {ceiling} (roughly the most a model drawing through it can "
            f"score). {grids}"
        )

    def grid_prompt_texts(self) -> dict[str, list[str]]:
        items = self.items()
        return {c: [p for p, t in items if t["category"] == c][: self.grid_prompts] for c in self.categories
                if self.grid_prompts}
