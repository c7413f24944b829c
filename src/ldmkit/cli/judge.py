"""`python -m ldmkit.cli.judge --cache-dir DIR`: train (or reuse)
the shapes attribute classifier that judges prompt-following (`ldmkit.eval.attributes`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from ldmkit.eval.attributes import load_attribute_classifier


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ldmkit.cli.judge --cache-dir DIR`: train (or reuse) the judge before it is needed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, required=True, help="folder that keeps the judge's safetensors")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    load_attribute_classifier(args.cache_dir, args.resolution, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
