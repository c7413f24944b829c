"""FID between two image folders: ldmkit.eval.fid vs torch-fidelity's `calculate_metrics`.

ldmkit: `InceptionFeatureExtractor` (torch-fidelity's own Inception-v3 module), `folder_feature_stats`
(streaming `FeatureStats`) for both folders, then `compute_fid`. Peer: `torch_fidelity.calculate_metrics(
input1, input2, fid=True)` with its defaults (batch 64, DataLoader with min(4, 2 x cores) workers,
no cache). Both run end to end from the weights file and the PNG folders on every call (network
construction, decoding, Inception at 299x299, statistics, the Frechet distance), alternately; the
values must agree. `--reuse` adds ldmkit with one extractor reused across calls, as `eval.py` does.

No real Inception weights offline: a state dict of the right shapes with random, variance-preserving
weights is written (`tests/eval/conftest.py: random_inception_state_dict`). The computation (convs,
resize, statistics, eigenvalues) and so the throughput do not depend on the weight values.

    python bench/fid_throughput.py [--quick] [--images 16] [--reuse] [--size 128] [--threads 1] [--device cpu]
    python bench/fid_throughput.py --profile
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

sys.path.insert(0, str(common.ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=16, help="PNG images per folder")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warmup round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reuse", action="store_true", help="also time ldmkit with one extractor reused across calls")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 8, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch
    import torch_fidelity

    from ldmkit.eval.inception import InceptionFeatureExtractor
    from ldmkit.eval.reference_stats import folder_feature_stats
    from tests.eval.conftest import random_inception_state_dict, write_png_folder

    common.header("FID throughput: ldmkit.eval.fid vs torch_fidelity.calculate_metrics", device=args.device)
    work = Path(tempfile.mkdtemp(prefix="ldmkit-fid-bench-"))
    weights = work / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(), weights)
    first = write_png_folder(work / "a", args.images, args.size, seed=1, smooth=False)
    second = write_png_folder(work / "b", args.images, args.size, seed=2, smooth=True)
    print(f"two folders of {args.images} PNGs at {args.size}x{args.size} (noise / colour ramps), Inception-v3 with random "
          f"weights, {args.rounds} rounds after a warmup round\n", flush=True)

    def ours(extractor=None):
        extractor = extractor or InceptionFeatureExtractor(weights, device=args.device)
        return folder_feature_stats(first, extractor).compute_fid(folder_feature_stats(second, extractor))

    def theirs():
        return torch_fidelity.calculate_metrics(
            input1=str(first), input2=str(second), cuda=args.device.startswith("cuda"), fid=True,
            feature_extractor_weights_path=str(weights), cache=False, verbose=False,
        )["frechet_inception_distance"]

    shared = InceptionFeatureExtractor(weights, device=args.device)
    if args.profile:
        import torch.profiler as tp

        ours(shared)
        with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
            ours(shared)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        import cProfile
        import pstats

        for name, fn in (("ldmkit", ours), ("torch-fidelity", theirs)):
            profiler = cProfile.Profile()
            profiler.runcall(fn)
            print(f"--- cProfile {name}")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        return

    values: dict[str, float] = {}

    def record(name, fn):
        def call():
            values[name] = fn()
        return call

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    candidates = {"ldmkit": record("ldmkit", ours), "torch-fidelity": record("torch-fidelity", theirs)}
    if args.reuse:
        candidates["ldmkit, extractor reused"] = record("ldmkit, extractor reused", lambda: ours(shared))
    results = common.interleave(candidates, repeats=args.rounds, warmup=1, sync=sync)
    peer = results["torch-fidelity"]
    n = 2 * args.images
    rows = [[name, s.median, s.spread(), s.median_cpu, n / s.median, peer.median / s.median, values[name]]
            for name, s in results.items()]
    common.print_table(["implementation", "s per FID (median)", "IQR", "CPU s (main process)", "images/s",
                        "speed vs torch-fidelity", "FID"], rows)
    rel = abs(values["ldmkit"] - values["torch-fidelity"]) / abs(values["torch-fidelity"])
    print(f"throughput ratio (torch-fidelity time / ldmkit time): {common.verdict(peer.median / results['ldmkit'].median, 1.0)}")
    print(f"FID agreement: ldmkit {values['ldmkit']:.6f} vs torch-fidelity {values['torch-fidelity']:.6f} (relative difference {rel:.1e})")
    print("(CPU s counts this process only: torch-fidelity decodes in DataLoader worker processes)")
    print(f"at end: {common.load_average()}")


if __name__ == "__main__":
    main()
