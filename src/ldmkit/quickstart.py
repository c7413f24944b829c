"""`python -m ldmkit.quickstart` (what `make quickstart` runs): the command lives in `ldmkit.cli.quickstart`."""

from __future__ import annotations

import sys

from ldmkit.cli.quickstart import StageFailed, Step, main, run_lanes, run_step, thread_env, train_step  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
