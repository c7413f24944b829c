"""Reading and writing weights for import/export without a second copy in memory, and atomic outputs.

Inputs are read one tensor at a time (`safetensors.safe_open`; torch files with `weights_only=True` and
`mmap=True`, so a pickle that needs code is refused and tensors stay on disk until touched). Outputs are
written tensor by tensor in the safetensors format (header, then each tensor's bytes straight from its
storage), since `safetensors.torch.save_file` first builds the bytes of every tensor at once. Folders are
built in a temporary sibling and renamed into place; nothing is written where the user looks on failure,
and a file the exporter did not write is never deleted.
"""

from __future__ import annotations

import contextlib
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


class LazyTensors(Mapping):
    """Read-only mapping key -> tensor over weight files, reading a tensor when it is asked for (as float32
    when `float32`, the dtype ldmkit trains and samples in)."""

    def __init__(self, files: list[Path], prefix: str = "", float32: bool = True) -> None:
        self.prefix, self.float32 = prefix, float32
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
        from ldmkit.nn.weights_file import load_torch_file

        data = load_torch_file(path, "Checkpoint")  # weights_only=True: refuses pickles that need code
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            self.extra.update({k: v for k, v in data.items() if k != "state_dict" and not isinstance(v, (dict, torch.Tensor))})
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise InteropError(f"'{path}' holds a {type(data).__name__}, not a state dict of tensors.")
        for key, value in data.items():
            if isinstance(value, torch.Tensor) and key.startswith(self.prefix):
                self._where[key[len(self.prefix):]] = value

    def __getitem__(self, key: str) -> torch.Tensor:
        where = self._where[key]
        tensor = where[0].get_tensor(where[1]) if isinstance(where, tuple) else where
        return tensor.float() if self.float32 and tensor.is_floating_point() else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def subset(self, prefix: str) -> "LazyTensors":
        """The entries under `prefix`, with the prefix removed (no tensor is read)."""
        view = LazyTensors([], float32=self.float32)
        view._where = {k[len(prefix):]: v for k, v in self._where.items() if k.startswith(prefix)}
        view.extra = self.extra
        return view


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """The safetensors format written one tensor at a time (8-byte header size, JSON header, raw bytes)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    items = sorted(tensors.items())
    for key, t in items:
        if t.dtype not in _DTYPES:
            raise InteropError(f"tensor '{key}' has dtype {t.dtype}, which safetensors cannot store.")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            data = t.detach().to("cpu").contiguous()
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))


def write_artifact(folder: Path, kind: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                   format_version: int) -> None:
    """An ldmkit artifact (`weights.safetensors` + `config.json`) written into an existing empty folder."""
    from ldmkit.artifacts import CONFIG_FILE, WEIGHTS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"kind": kind})
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
