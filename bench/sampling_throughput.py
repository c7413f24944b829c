"""Text-to-image sampling throughput per sampler, batched classifier-free guidance vs two forwards.

`ldmkit.txt2img.TextToImage.generate` (text encoding, sampler loop, decoding) at 20 steps with
guidance, on tiny random stage artifacts (tests/artifacts.py: `write_autoencoder`, `write_clip`,
`write_ldm`; 32 px images, 8x8x4 latents). ldmkit's guidance (`classifier_free_guidance`) runs cond
and uncond as ONE forward of batch 2B per model evaluation; the peer is the same `generate` with the
guidance swapped for the naive loop: two separate forwards (cond, then uncond) of batch B each. The
two are interleaved per sampler and must give the same images (same seeds, same maths).

    PYTHONPATH=. python bench/sampling_throughput.py [--quick] [--batch 8] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

sys.path.insert(0, str(common.ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per sampler after one warmup round")
    p.add_argument("--samplers", nargs="+", default=None, help="default: all of ldmkit.diffusion.SAMPLERS")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 2
    return args


@dataclass
class TwoPassGuidance:
    """The naive classifier-free guidance: `model(x, t, cond)` and `model(x, t, uncond)` separately."""

    model: Callable
    cond: Any
    uncond: Any
    scale: float

    def __call__(self, x_t, t):
        from ldmkit.diffusion.guidance import expand_batch

        batch = x_t.shape[0]
        out_cond = self.model(x_t, t, expand_batch(self.cond, batch))
        out_uncond = self.model(x_t, t, expand_batch(self.uncond, batch))
        return out_uncond + self.scale * (out_cond - out_uncond)


def two_pass_guidance(model, cond, uncond, scale, *, rescale: float = 0.0, **_: Any) -> TwoPassGuidance:
    if rescale:
        raise ValueError("the two-pass peer does not implement guidance rescale")
    return TwoPassGuidance(model, cond, uncond, float(scale))


@contextlib.contextmanager
def naive_guidance():
    """`generate` exactly as it is, except that guidance makes two forwards per model evaluation."""
    import ldmkit.generator  # where `TextToImage.generate` binds the guidance

    with mock.patch.object(ldmkit.generator, "classifier_free_guidance", two_pass_guidance):
        yield


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from ldmkit.diffusion import SAMPLERS, nfe
    from ldmkit.txt2img import load_text_to_image
    from tests.artifacts import write_autoencoder, write_clip, write_ldm

    common.header("Sampling throughput: batched CFG (one 2B forward) vs two B forwards per step", device=args.device)
    work = Path(tempfile.mkdtemp(prefix="ldmkit-sampling-bench-"))
    ae, clip = write_autoencoder(work / "autoencoder"), write_clip(work / "clip")
    tti = load_text_to_image(write_ldm(work / "ldm", ae, clip), device=args.device)
    unet_params = sum(p.numel() for p in tti.unet.parameters())
    print(f"tiny random artifacts (tests/artifacts.py): UNet {unet_params / 1e6:.2f}M parameters, {tti.resolution}px images, "
          f"latents {tti.latent_channels}x{tti.resolution // tti.downsampling_factor}x{tti.resolution // tti.downsampling_factor}; "
          f"batch {args.batch}, {args.steps} steps, guidance {args.guidance}, {args.rounds} rounds per sampler\n", flush=True)

    prompts = [f"a {c} {s}" for c, s in zip(["red", "blue", "green", "yellow"] * 8, ["circle", "square", "star", "triangle"] * 8)]
    prompts, seeds = prompts[: args.batch], list(range(args.batch))
    samplers = args.samplers or list(SAMPLERS)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    rows, ratios = [], []
    for name in samplers:
        outputs: dict[str, torch.Tensor] = {}

        def batched(name=name):
            outputs["batched"] = tti.generate(prompts, seeds, sampler=name, steps=args.steps, guidance_scale=args.guidance)

        def naive(name=name):
            with naive_guidance():
                outputs["naive"] = tti.generate(prompts, seeds, sampler=name, steps=args.steps, guidance_scale=args.guidance)

        r = common.interleave({"batched": batched, "naive": naive}, repeats=args.rounds, warmup=1, sync=sync)
        diff = float((outputs["batched"] - outputs["naive"]).abs().max())
        ratio = r["naive"].median / r["batched"].median
        ratios.append(ratio)
        rows.append([name, nfe(name, args.steps), args.batch / r["batched"].median, r["batched"].spread(),
                     args.batch / r["naive"].median, r["naive"].spread(), ratio,
                     r["naive"].median_cpu / r["batched"].median_cpu, f"{diff:.1e}"])
        print(f"  {name}: {ratio:.2f}x", flush=True)
    print()
    common.print_table(["sampler", "model evals", "images/s batched CFG", "IQR", "images/s two forwards", "IQR",
                        "speed-up (wall)", "speed-up (CPU time)", "max |image diff|"], rows)
    print(f"batched-CFG speed-up, median over samplers: {common.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
