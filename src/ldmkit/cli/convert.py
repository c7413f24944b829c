"""`python -m ldmkit.cli.convert import|export ...` (also `python -m ldmkit.interop.convert`): Stable Diffusion
checkpoints in and out; options in `ldmkit.interop.convert`."""

from ldmkit.interop.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
