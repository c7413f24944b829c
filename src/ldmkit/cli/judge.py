"""`python -m ldmkit.cli.judge --cache-dir DIR`: train (or reuse) the shapes attribute classifier that judges
prompt-following (`ldmkit.eval.attributes`); `--measure N` also prints, as JSON, how right the judges are on
real rendered images: the classifier's per-field accuracy on N single-object test scenes, and the object
judge's per-category accuracy on N prompts per category of the compositional suite (an image that follows
each prompt and one that does not, `ldmkit.eval.compositional`)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ldmkit.eval.attributes import load_attribute_classifier


def measure(classifier: torch.nn.Module, resolution: int, count: int, seed: int) -> dict[str, Any]:
    """The judges' accuracy on real rendered images (what the metrics' notes report)."""
    from ldmkit.data.shapes import ShapesDataModule, ShapesDataset
    from ldmkit.eval.attributes import attribute_accuracy
    from ldmkit.eval.compositional import judge_accuracy, judge_accuracy_on_real
    from ldmkit.eval.objects import ObjectJudge

    task, suite = ShapesDataModule.attribute_task(), ShapesDataModule.compositional_suite()
    real = ShapesDataset("test", size=count, resolution=resolution, seed=seed, two_object_prob=0.0)
    samples = real.__getitems__(range(count))
    fields = attribute_accuracy(classifier, torch.stack([s["image"] for s in samples]),
                                [s["attributes"] for s in samples])
    judge = ObjectJudge(classifier, task["palette"], task["anchors"])
    counts = judge_accuracy_on_real(judge.read, suite, [t for _, t in suite["prompts"](count, seed)], resolution,
                                    seed=seed + 7919)
    return {"single_object_fields": fields,
            "suite": {c: {"accuracy": judge_accuracy(k), **k} for c, k in counts.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ldmkit.cli.judge --cache-dir DIR`: train (or reuse) the judge before it is needed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, required=True, help="folder that keeps the judge's safetensors")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--measure", type=int, default=0, metavar="N",
                        help="print the judges' accuracy on real images (N scenes; N prompts per suite category)")
    parser.add_argument("--seed", type=int, default=0, help="draws the measured scenes and prompts")
    args = parser.parse_args(argv)
    if args.measure < 0:
        parser.error(f"--measure must be >= 0 (0: do not measure), got {args.measure}")
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    classifier = load_attribute_classifier(args.cache_dir, args.resolution, args.steps)
    if args.measure:
        print(json.dumps(measure(classifier, args.resolution, args.measure, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
