"""Import Stable Diffusion checkpoints as ldmkit artifacts, export ldmkit LDMs to diffusers or a single file.

    python -m ldmkit.cli.convert import SRC out=DIR [prediction=eps|v] [overwrite=true]
        SRC: a diffusers StableDiffusionPipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or an
        original-layout single file (.safetensors, or .ckpt read with weights_only=True), SD 1.x or 2.x.
        Writes DIR/autoencoder, DIR/text_encoder (use as model.text_encoder=) and DIR/ldm (use as ckpt= / model.init=).
        prediction= only for SD 2.x single files (eps: 512-base, v: 768-v; default v, as diffusers assumes).
    python -m ldmkit.cli.convert export LDM out=PATH [format=diffusers|single_file] [overwrite=true]
        LDM: an ldm artifact folder with a UNet backbone. format=diffusers writes a folder that
        StableDiffusionPipeline.from_pretrained(PATH) loads offline; single_file writes PATH (*.safetensors).
An existing out= is refused unless overwrite=true, which replaces only the files this command writes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ldmkit.interop.vae import InteropError

_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
OPTIONS = {"import": ("out", "prediction", "overwrite"), "export": ("out", "format", "overwrite")}


def parse(argv: Sequence[str]) -> tuple[str, str, dict[str, str]]:
    if len(argv) < 2 or argv[0] not in OPTIONS:
        raise InteropError(f"usage: {__doc__.strip().splitlines()[2].strip()}  |  python -m ldmkit.cli.convert export LDM out=PATH")
    command, source, options = argv[0], argv[1], {}
    for arg in argv[2:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS[command]:
            raise InteropError(f"unknown option '{arg}' for `{command}`; options: {', '.join(f'{o}=' for o in OPTIONS[command])}.")
        options[key] = value
    if "out" not in options:
        raise InteropError(f"`{command}` needs out=PATH (where to write).")
    if options.get("overwrite", "false").lower() not in _BOOL:
        raise InteropError(f"overwrite={options['overwrite']!r}: use true or false.")
    if options.get("prediction") not in (None, "eps", "v"):
        raise InteropError(f"prediction={options['prediction']!r}: use eps or v.")
    if options.get("format", "diffusers") not in ("diffusers", "single_file"):
        raise InteropError(f"format={options['format']!r}: use diffusers or single_file.")
    return command, source, options


def run(argv: Sequence[str]) -> dict[str, Path] | Path:
    command, source, options = parse(argv)
    overwrite = _BOOL[options.get("overwrite", "false").lower()]
    if command == "import":
        from ldmkit.interop.sd_import import import_checkpoint

        return import_checkpoint(source, options["out"], prediction=options.get("prediction"), overwrite=overwrite)
    from ldmkit.interop.sd_export import export_diffusers, export_single_file

    export = export_single_file if options.get("format") == "single_file" else export_diffusers
    return export(source, options["out"], overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        result = run(argv)
    except (InteropError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = result.values() if isinstance(result, dict) else [result]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
