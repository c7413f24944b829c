"""Reading and writing weights for import/export without a second copy in memory, and atomic outputs.

Inputs are memory-mapped and read one tensor at a time (`safetensors.safe_open`; torch files with
`weights_only=True`, so a pickle that needs code is refused, and `mmap=True`): a tensor is a view of the file
until something computes with it, in the file's dtype. Outputs are written tensor by tensor in the safetensors
format (header, then each tensor's bytes straight from its storage; fp16/bf16 upcast one tensor at a time
when asked), since `safetensors.torch.save_file` first builds the bytes of every tensor at once. Once a
tensor's bytes are written, the pages of the input file it was read from are handed back to the kernel
(`madvise(MADV_PAGEOUT)`, which keeps any page a caller modified), so peak RSS stays near the fused Q/K/V
copies plus one tensor instead of growing to the whole input (bench/convert_memory.py). Folders are built in
a temporary sibling and renamed into place; nothing is written where the user looks on failure, and a file
the exporter did not write is never deleted.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ldmkit.interop.vae import InteropError

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_UPCAST = (torch.float16, torch.bfloat16)  # stored as float32, the dtype ldmkit trains and samples in


class _MappedRanges:
    """Address ranges of memory-mapped input tensors, so the writer releases pages of those and nothing else."""

    MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; dirty private pages are kept (not in Python's mmap)

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):  # no libc madvise (not Linux/macOS): pages stay until the file is closed
            self._madvise = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Forget the ranges when the conversion ends (the files are unmapped with their last tensor)."""
        try:
            yield
        finally:
            self.starts, self.ends = [], []

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] == start:
            return
        self.starts.insert(i, start)
        self.ends.insert(i, start + storage.nbytes())

    def release(self, tensor: torch.Tensor) -> None:
        """Hand back the whole pages of `tensor`'s bytes when they lie in a mapped input (a no-op otherwise)."""
        if self._madvise is None or not tensor.numel():
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        i = bisect.bisect_right(self.starts, start) - 1
        if i >= 0 and end <= self.ends[i] and tensor.is_contiguous():
            self._pageout(start, end)

    def release_all(self) -> None:
        """Hand back every page read so far (e.g. the Q/K/V inputs of fused copies); views stay valid and re-read."""
        if self._madvise is not None:
            for start, end in zip(self.starts, self.ends):
                self._pageout(start, end)

    def _pageout(self, start: int, end: int) -> None:
        first, last = -(-start // self.page) * self.page, end // self.page * self.page  # whole pages inside only
        if last > first:
            self._madvise(first, last - first, self.MADV_PAGEOUT)  # a hint: failure (old kernel) only costs memory


MAPPED = _MappedRanges()


class LazyTensors(Mapping):
    """Read-only mapping key -> tensor over weight files, reading a tensor (a view of the memory-mapped file, in
    the file's dtype) when it is asked for."""

    def __init__(self, files: list[Path], prefix: str = "") -> None:
        self.prefix = prefix
        self._where: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}  # non-tensor entries of torch files (e.g. global_step)
        self.metadata: dict[str, str] = {}  # safetensors header metadata
        for path in files:
            self._index(Path(path))

    def _index(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                keys = list(handle.keys())
                self.metadata.update(handle.metadata() or {})
            except Exception as err:
                raise InteropError(f"'{path}' cannot be read as safetensors ({err}): it is truncated or corrupt.") from err
            for key in keys:
                if key.startswith(self.prefix):
                    self._where[key[len(self.prefix):]] = (handle, key)
            return
        data = _load_torch_mmap(path)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            self.extra.update({k: v for k, v in data.items() if k != "state_dict" and not isinstance(v, (dict, torch.Tensor))})
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise InteropError(f"'{path}' holds a {type(data).__name__}, not a state dict of tensors.")
        for key, value in data.items():
            if isinstance(value, torch.Tensor) and key.startswith(self.prefix):
                self._where[key[len(self.prefix):]] = value
                MAPPED.add(value)

    def __getitem__(self, key: str) -> torch.Tensor:
        where = self._where[key]
        if not isinstance(where, tuple):
            return where
        tensor = where[0].get_tensor(where[1])  # safetensors >= 0.4: a view of its memory map, no copy
        MAPPED.add(tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def subset(self, prefix: str) -> "LazyTensors":
        """The entries under `prefix`, with the prefix removed (no tensor is read)."""
        view = LazyTensors([])
        view._where = {k[len(prefix):]: v for k, v in self._where.items() if k.startswith(prefix)}
        view.extra = self.extra
        return view


def _load_torch_mmap(path: Path) -> Any:
    """`torch.load(weights_only=True, mmap=True)`; files torch cannot map (the legacy format) and files it refuses
    go through `load_torch_file`, which reads them whole or names why a pickle was refused."""
    from ldmkit.nn.weights_file import load_torch_file

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the second read raises the precise error
        return load_torch_file(path, "Checkpoint")


def artifact_tensors(folder: Path, kind: str) -> tuple[LazyTensors, dict[str, Any]]:
    """An artifact's (tensors read lazily from its memory-mapped weights, config), checked like `load_artifact`."""
    from ldmkit.artifacts import WEIGHTS_FILE, ArtifactError, read_artifact_config

    config = read_artifact_config(folder, kind)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"'{folder}' has no {WEIGHTS_FILE}: the artifact is incomplete, write it again.")
    return LazyTensors([weights]), config


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      upcast: bool = False) -> None:
    """The safetensors format written one tensor at a time (8-byte header size, JSON header, raw bytes);
    `upcast` stores fp16/bf16 tensors as float32. Pages of memory-mapped inputs are released once written."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    items = sorted(tensors.items())
    for key, t in items:
        dtype = torch.float32 if upcast and t.dtype in _UPCAST else t.dtype
        if dtype not in _DTYPES:
            raise InteropError(f"tensor '{key}' has dtype {t.dtype}, which safetensors cannot store.")
        size = t.numel() * dtype.itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            data = t.detach().to("cpu").contiguous()
            if upcast and data.dtype in _UPCAST:
                data = data.float()
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            MAPPED.release(t)
            del data


def write_artifact(folder: Path, kind: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   format_version: int) -> None:
    """An ldmkit artifact (`weights.safetensors` + `config.json`, fp16/bf16 weights stored as float32) written
    into an existing empty folder."""
    from ldmkit.artifacts import CONFIG_FILE, WEIGHTS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"kind": kind}, upcast=True)
    meta = {"kind": kind, "format_version": format_version, **config}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_output(target: Path, overwrite: bool, what: str) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it becomes `target`. With `overwrite=True` and an
    existing `target`, each written file replaces its namesake there and every other file is left alone."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise InteropError(f"{what} target '{target}' already exists: pass overwrite=true to replace the files this "
                           "command writes there (other files are kept), or choose a new out=.")
    if target.exists() and not target.is_dir():
        raise InteropError(f"{what} target '{target}' is a file, not a folder: choose another out=.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            tmp.rename(target)
            return
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dest = target / path.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
