"""The machine part of `bench/gpu_check.py`: GPU name, driver, torch / CUDA / cuDNN versions, the
versions of ldmkit's dependencies as imported, and the dense matmul peak the MFU figures divide by
(prints one BENCH_RESULT JSON line).

    python bench/gpu_check_env.py --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PACKAGES = ["torch", "torchvision", "lightning", "hydra", "omegaconf", "open_clip", "torch_fidelity", "torchdata",
            "webdataset", "diffusers", "transformers", "safetensors", "torchmetrics", "numpy", "scipy", "triton"]


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            out[name] = str(getattr(module, "__version__", "?")) + f" ({Path(module.__file__).parent})"
        except Exception as error:  # noqa: BLE001 - a missing package is a finding, not a crash
            out[name] = f"MISSING: {type(error).__name__}: {error}"
    return out


def nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def nccl_version() -> str | None:
    try:
        version = torch_module().cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def torch_module():
    import torch

    return torch


def matmul_peak(device: str, dtype: str, n: int) -> float:
    """Dense n x n x n matmul FLOP/s, best of 10 after 3 warm-ups."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=torch_dtype) for _ in range(2))
    best = float("inf")
    for i in range(13):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--matmul-size", type=int, default=None, help="default 8192 on CUDA, 512 on CPU")
    args = p.parse_args(argv)
    import torch

    facts = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpu": common.cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda_device_count": torch.cuda.device_count(),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nvidia_smi": nvidia_smi(), "packages": versions(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                     multiprocessors=props.multi_processor_count, nccl=nccl_version())
    device = args.device if torch.cuda.is_available() or not args.device.startswith("cuda") else "cpu"
    n = args.matmul_size or (8192 if device.startswith("cuda") else 512)
    facts["matmul_peak_tflops"] = {dtype: matmul_peak(device, dtype, n) / 1e12 for dtype in ("bf16", "fp32")}
    facts["matmul_size"], facts["matmul_device"] = n, device
    print(f"{facts.get('gpu', facts['cpu'])}: bf16 matmul {facts['matmul_peak_tflops']['bf16']:.1f} TFLOP/s", flush=True)
    common.child_result(facts)


if __name__ == "__main__":
    main()
