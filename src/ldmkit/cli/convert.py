"""`python -m ldmkit.cli.convert import SRC out=DIR | export LDM out=PATH`: Stable Diffusion checkpoints
to ldmkit artifacts and back (arguments and options: `ldmkit.interop.convert`)."""

from __future__ import annotations

from ldmkit.interop.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
