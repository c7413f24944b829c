"""Tiny on-disk fixtures for the data tests: image bytes of any mode, tar shards, image folders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (24, 16), fmt: str = "PNG", value: int | tuple = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, format=fmt)
    return buffer.getvalue()


def gradient_png(size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, image: bytes | None, caption: str | None = None, meta: dict | None = None,
                   ext: str = "png") -> list[tuple[str, bytes]]:
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def numbered_shards(folder: Path, n_shards: int, per_shard: int, size: int = 32) -> list[Path]:
    """Shards whose samples carry {"attributes": {"id": i}} and caption "sample i"."""
    paths = []
    for shard in range(n_shards):
        members = []
        for j in range(per_shard):
            i = shard * per_shard + j
            members += sample_members(f"{shard:05d}{j:04d}", gradient_png(size, i), f"sample {i}", {"attributes": {"id": i}})
        paths.append(write_tar(folder / f"{shard:05d}.tar", members))
    return paths
