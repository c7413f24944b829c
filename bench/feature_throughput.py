"""Feature extraction throughput (images/s) for FD-DINOv2 / prdc (DINOv2) and CMMD (CLIP): ldmkit's
extractors vs the reference implementations' own loops on the same PNG folder and the same network.

ldmkit: PNGs decoded to uint8 tensors, one batched PIL-equivalent resize (torchvision's uint8 kernel),
normalisation, the network (`ldmkit.eval.features`). Peers, as their code reads images:
- dgm-eval (DINOv2): per image `PIL.Image.open` -> `Resize((224, 224), BICUBIC)` -> `ToTensor` ->
  `Normalize(ImageNet)` in a torch DataLoader (`--workers`), then the network on the batch;
- google-research cmmd (CLIP): per image PIL open -> centre crop -> PIL bicubic resize -> float32 numpy
  -> batch / 255 -> CLIP mean/std, then the network (the reference runs scenic's JAX CLIP; here the
  same open_clip model as ours, so the ratio measures the pipelines around one network).
Networks have random weights (throughput does not depend on them): `--dinov2 large` is ViT-L/14,
`--clip-arch ViT-L-14-336` the paper's CLIP; the defaults are tiny (a smoke run).

    python bench/feature_throughput.py [--images 64] [--size 256] [--batch 32] [--dinov2 tiny|large]
        [--clip-arch ViT-L-14-336] [--device cuda] [--workers 4] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

sys.path.insert(0, str(common.ROOT))

DINOV2_SIZES = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1),
                "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dinov2", choices=sorted(DINOV2_SIZES), default="tiny")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture (random weights); default: a tiny CLIP")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the peer loops")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def write_networks(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from ldmkit.artifacts import save_artifact
    from ldmkit.nn.clip import artifact_config, build_clip

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(patch_size=14, image_size=518, **DINOV2_SIZES[args.dinov2])).save_pretrained(work / "dinov2")
    if args.clip_arch:
        clip = build_clip(model_name=args.clip_arch)
    else:
        from tests.artifacts import TINY_CLIP

        clip = build_clip(model_cfg=TINY_CLIP)
    save_artifact(work / "clip", "clip", clip.state_dict(), artifact_config(clip))
    return work / "dinov2", work / "clip"


def ours_loop(files: list[Path], extractor, batch: int):
    import torch

    from ldmkit.eval.features.common import stack_images
    from ldmkit.eval.reference_stats import read_image_uint8

    out = [extractor(stack_images([read_image_uint8(f) for f in files[i : i + batch]])) for i in range(0, len(files), batch)]
    return torch.cat(out)


def dgm_eval_loop(files: list[Path], net, device: str, batch: int, workers: int):
    import torch
    import torchvision.transforms as TF
    from PIL import Image

    transform = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor(),
                            TF.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB"))

    out = []
    with torch.no_grad():
        for x in torch.utils.data.DataLoader(Folder(), batch_size=batch, num_workers=workers):
            out.append(net(pixel_values=x.to(device)).pooler_output.float())
    return torch.cat(out)


def cmmd_loop(files: list[Path], extractor, device: str, batch: int):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    def read(path: Path) -> np.ndarray:  # google-research cmmd io_util._read_image + _center_crop_and_resize
        im = Image.open(path).convert("RGB")
        w, h = im.size
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((extractor.size, extractor.size), Image.BICUBIC)
        return np.asarray(im).astype(np.float32)

    mean = torch.tensor(extractor.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(extractor.std, device=device).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(files), batch):
            x = torch.from_numpy(np.stack([read(f) for f in files[i : i + batch]]) / 255.0).to(device)
            x = (x.permute(0, 3, 1, 2).float() - mean) / std
            out.append(F.normalize(extractor.net.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    from ldmkit.eval.features.clip import CLIPImageFeatureExtractor
    from ldmkit.eval.features.dinov2 import DINOv2FeatureExtractor
    from tests.eval.conftest import write_png_folder

    common.header("Feature extraction throughput: ldmkit.eval.features vs dgm-eval / cmmd loops", device=args.device)
    work = Path(tempfile.mkdtemp(prefix="ldmkit-feature-bench-"))
    files = sorted(write_png_folder(work / "images", args.images, args.size, seed=1, smooth=False).glob("*.png"))
    dinov2_path, clip_path = write_networks(work, args)
    dinov2 = DINOv2FeatureExtractor(dinov2_path, device=args.device)
    clip = CLIPImageFeatureExtractor(clip_path, device=args.device)
    print(f"{args.images} PNGs at {args.size}x{args.size}, batch {args.batch}, DINOv2 {args.dinov2} (width {dinov2.dim}), "
          f"CLIP {args.clip_arch or 'tiny'} at {clip.size}px, peer DataLoader workers {args.workers}, "
          f"{args.rounds} rounds after a warmup round\n", flush=True)

    outputs: dict[str, torch.Tensor] = {}

    def record(name, fn):
        def call():
            outputs[name] = fn()
        return call

    candidates = {
        "ldmkit DINOv2": record("ldmkit DINOv2", lambda: ours_loop(files, dinov2, args.batch)),
        "dgm-eval loop": record("dgm-eval loop", lambda: dgm_eval_loop(files, dinov2.net, args.device, args.batch, args.workers)),
        "ldmkit CLIP": record("ldmkit CLIP", lambda: ours_loop(files, clip, args.batch)),
        "cmmd loop": record("cmmd loop", lambda: cmmd_loop(files, clip, args.device, args.batch)),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    results = common.interleave(candidates, repeats=args.rounds, warmup=1, sync=sync)
    rows = []
    for ours, peer in (("ldmkit DINOv2", "dgm-eval loop"), ("ldmkit CLIP", "cmmd loop")):
        gap = float((outputs[ours].cpu() - outputs[peer].cpu()).abs().max())
        for name in (ours, peer):
            s = results[name]
            rows.append([name, s.median, s.spread(), s.median_cpu, args.images / s.median,
                         results[peer].median / s.median, gap])
    common.print_table(["loop", "s (median)", "IQR", "CPU s (main process)", "images/s", "speed vs reference loop",
                        "max |feature diff|"], rows)
    for ours, peer in (("ldmkit DINOv2", "dgm-eval loop"), ("ldmkit CLIP", "cmmd loop")):
        print(f"{ours} throughput ratio (reference time / ldmkit time): "
              f"{common.verdict(results[peer].median / results[ours].median, 1.0)}")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
