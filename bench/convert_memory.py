"""Peak memory and time of importing and exporting a Stable Diffusion model (issue 17: peak RSS within
1.3x the model's size, i.e. tensors are streamed and never held twice).

An SD-1.5-shaped pipeline with random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M
parameters; fp32, or fp16 like the hub's fp16 variants) is written with diffusers/transformers
`save_pretrained`; ldmkit then imports it, exports it to a diffusers folder and to a single file, and
imports that single file. Each step runs in a fresh process whose peak RSS (`VmHWM`: the whole process,
torch's own libraries and memory-mapped file pages included) is reported next to the model's size (the
bytes of its weights as float32, what ldmkit holds). Peers in the same run, on the same files:
- diffusers: `StableDiffusionPipeline.from_pretrained` + `save_pretrained` (a diffusers-to-diffusers copy);
- safetensors: `load_file` of every weights file, each tensor copied into memory (`.clone()`), the floor
  of any converter that materialises the model.
`baseline` is a process that only imports what ldmkit's converter imports (torch, open_clip): the memory
every step holds before it reads a byte (about 0.5 GiB with a CUDA build of torch).

    python bench/convert_memory.py [--size sd15|tiny] [--dtype fp32|fp16] [--dir DIR] [--keep] [--json PATH]

`--dir` holds the model files (several GB for sd15: use a disk with room, e.g. /tmp); without `--keep`
the files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 1.3  # issue 17: peak RSS <= 1.3 x the model's size
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {  # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs)
        "unet": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu", projection_dim=768),
    },
    "tiny": {  # the shapes of tests/interop (a smoke run)
        "unet": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=64,
                     attention_head_dim=8, sample_size=8),
        "vae": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, sample_size=16,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                     hidden_act="quick_gelu"),
    },
}
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


# ---- the steps, each run in its own process (`--child STEP`) --------------------------------------

def build(work: Path, size: str, dtype: str = "fp32") -> None:
    """The SD pipeline folder `work/sd` with random weights (in `dtype`), saved by diffusers/transformers."""
    import diffusers
    import torch
    import transformers

    from ldmkit.interop.tokenizer import write_tokenizer_folder

    torch.manual_seed(0)
    spec = SIZES[size]
    unet = diffusers.UNet2DConditionModel(**spec["unet"])
    vae = diffusers.AutoencoderKL(**spec["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=49408, **spec["text"]))
    folder = work / "sd"
    write_tokenizer_folder(folder / "tokenizer", 49407)
    scheduler = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)


def import_folder(work: Path) -> None:
    from ldmkit.interop.sd_import import import_checkpoint

    import_checkpoint(work / "sd", work / "imported")


def export_diffusers(work: Path) -> None:
    from ldmkit.interop.sd_export import export_diffusers as export

    export(work / "imported" / "ldm", work / "exported")


def export_single_file(work: Path) -> None:
    from ldmkit.interop.sd_export import export_single_file as export

    export(work / "imported" / "ldm", work / "model.safetensors")


def import_single_file(work: Path) -> None:
    from ldmkit.interop.sd_import import import_checkpoint

    import_checkpoint(work / "model.safetensors", work / "imported_single")


def diffusers_round_trip(work: Path) -> None:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(work / "sd", local_files_only=True)
    pipe.save_pretrained(work / "peer_diffusers", safe_serialization=True)


def safetensors_load(work: Path) -> None:
    from safetensors.torch import load_file

    held = [{k: v.clone() for k, v in load_file(str(work / "sd" / name / file)).items()} for name, file in WEIGHTS.items()]
    assert held


def baseline(work: Path) -> None:
    import open_clip  # noqa: F401  (the converter's text-encoder and tokenizer code: torchvision, torch._dynamo)

    import ldmkit.interop.sd_export  # noqa: F401
    import ldmkit.interop.sd_import  # noqa: F401


STEPS = {  # name -> (function, whose, what it does)
    "baseline": (baseline, "-", "the converter's imports (torch, open_clip, ldmkit.interop), no weights"),
    "import folder": (import_folder, "ldmkit", "diffusers folder -> 3 ldmkit artifacts"),
    "export diffusers": (export_diffusers, "ldmkit", "ldm artifact -> diffusers folder"),
    "export single file": (export_single_file, "ldmkit", "ldm artifact -> original-layout .safetensors"),
    "import single file": (import_single_file, "ldmkit", "original-layout .safetensors -> 3 ldmkit artifacts"),
    "diffusers from_pretrained + save_pretrained": (diffusers_round_trip, "peer", "diffusers folder -> diffusers folder"),
    "safetensors load_file + clone": (safetensors_load, "peer", "every tensor of the folder copied into memory"),
}


def _vmhwm_kib() -> int:
    import resource

    try:
        return common._status_kib("VmHWM")
    except (OSError, RuntimeError):  # no /proc: ru_maxrss is KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(step: str, work: Path, size: str, dtype: str) -> None:
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    if step == "build":
        build(work, size, dtype)
    else:
        STEPS[step][0](work)
    common.child_result({"seconds": time.perf_counter() - start, "peak_kib": _vmhwm_kib()})


# ---- the parent ------------------------------------------------------------------------------------

def model_bytes(folder: Path) -> tuple[int, int, int]:
    """(bytes of the weights as stored, as float32 (what ldmkit holds), bytes of the folder on disk) of an SD folder."""
    import struct

    stored = fp32 = 0
    for name, file in WEIGHTS.items():
        with open(folder / name / file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, v in header.items():
            if key != "__metadata__":
                size = v["data_offsets"][1] - v["data_offsets"][0]
                stored += size
                fp32 += size * (2 if v["dtype"] in ("F16", "BF16") else 1)
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return stored, fp32, disk


def run(size: str, dtype: str, work: Path, steps: list[str]) -> dict[str, Any]:
    argv = lambda step: ["--child", step, "--dir", str(work), "--size", size, "--dtype", dtype]  # noqa: E731
    built = common.run_child(__file__, argv("build"), timeout=3600)
    stored, tensors, disk = model_bytes(work / "sd")
    rows = []
    for step in steps:
        result = common.run_child(__file__, argv(step), timeout=3600)
        peak = result["peak_kib"] * 1024
        rows.append({"step": step, "whose": STEPS[step][1], "what": STEPS[step][2], "peak_rss_bytes": peak,
                     "ratio": peak / tensors, "seconds": result["seconds"]})
    return {"size": size, "dtype": dtype, "model_bytes": tensors, "stored_bytes": stored, "disk_bytes": disk,
            "build_seconds": built["seconds"], "target": TARGET, "machine": common.machine_summary(),
            "load": common.load_average(), "rows": rows}


def report(result: dict[str, Any]) -> None:
    gib = 2**30
    print(f"model: {result['size']}, weights {result['model_bytes'] / gib:.3f} GiB as float32 (the model's size below; "
          f"{result['dtype']} in the files: {result['stored_bytes'] / gib:.3f} GiB), folder on disk "
          f"{result['disk_bytes'] / gib:.3f} GiB; built in {result['build_seconds']:.1f} s")
    rows = result["rows"]
    base = next((r["peak_rss_bytes"] for r in rows if r["step"] == "baseline"), None)
    common.print_table(
        ["step", "whose", "peak RSS GiB", "peak RSS / model size", "over baseline / model size", "time s"],
        [[r["step"], r["whose"], r["peak_rss_bytes"] / gib, round(r["ratio"], 3),
          round((r["peak_rss_bytes"] - base) / result["model_bytes"], 3) if base else float("nan"), r["seconds"]]
         for r in rows])
    ours = [r for r in rows if r["whose"] == "ldmkit"]
    for r in ours:
        print(f"{r['step']}: peak RSS / model size = {common.verdict(r['ratio'], TARGET, higher_is_better=False)}")
    for peer in (r for r in rows if r["whose"] == "peer"):
        ratios = ", ".join(f"{r['step']} {r['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}" for r in ours)
        print(f"peak RSS ratio ldmkit / ({peer['step']}): {ratios}")
    print(f"at end: {result['load']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="sd15")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of the SD files (import writes fp32)")
    p.add_argument("--dir", type=Path, default=None, help="where the model files go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the model files")
    p.add_argument("--steps", nargs="+", choices=sorted(STEPS), default=list(STEPS), help="steps to run (default: all, in order)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.dir, args.size, args.dtype)
        return None
    common.header(f"Import/export peak memory ({args.size}, {args.dtype} files)", args)
    work = Path(tempfile.mkdtemp(prefix="ldmkit-convert-", dir=args.dir))
    try:
        result = run(args.size, args.dtype, work, [s for s in STEPS if s in args.steps])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
