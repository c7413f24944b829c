"""Read weight files a user points at (Inception, LPIPS/VGG, CLIP, ...) without running their code.

A `.pth`/`.pt`/`.bin` file is a pickle, and unpickling a file can call any Python function
(`os.system` included). Every user-supplied file is therefore read here, with
`torch.load(weights_only=True)` (tensors and plain containers only) or from safetensors, never by a
library's own loader, some of which unpickle fully (torch-fidelity's Inception loader) or fall back
to a full unpickle on some errors (open_clip's `load_state_dict`). A file that needs more is refused
with `UntrustedWeightsError`, which says so and how to convert a trusted file once.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SAFETENSORS_SUFFIX = ".safetensors"


class WeightsFileError(ValueError):
    """A weights file cannot be read (truncated, corrupt, not a weights file)."""


class UntrustedWeightsError(WeightsFileError):
    """A weights file needs arbitrary code to load, so it was refused on purpose."""


def convert_command(path: str | os.PathLike, torchscript: bool = False) -> str:
    """A one-line command that turns a trusted pickle (or TorchScript) file into plain safetensors."""
    out = Path(path).with_suffix(SAFETENSORS_SUFFIX)
    read = f"torch.jit.load({str(path)!r}).state_dict()" if torchscript else (
        f"torch.load({str(path)!r}, weights_only=False); sd = sd.get('state_dict', sd)")
    return (f"python -c \"import torch, safetensors.torch as st; sd = {read}; "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, {str(out)!r})\"")


def untrusted_message(path: str | os.PathLike, what: str, reason: str, fix: str | None = None,
                      torchscript: bool = False) -> str:
    fix = fix or (
        f"If you trust where it comes from, convert it once to a plain state dict with\n  "
        f"{convert_command(path, torchscript)}\nand pass the .safetensors file instead "
        "(torch.save of a dict of tensors works too)."
    )
    return (
        f"{what} '{path}' was refused on purpose: it needs arbitrary code to load ({reason}), and ldmkit never "
        f"runs code from a file it is given, since a crafted file can do anything on this machine when unpickled. "
        f"A file of plain weights loads without running any code. {fix}"
    )


_PLAIN = ("torch.", "collections.OrderedDict", "_codecs.encode")  # what torch.save of tensors references


def refusal_reason(err: BaseException, path: str | os.PathLike) -> str | None:
    """Why `torch.load(weights_only=True)` refused a file that needs code to load, or None when `err`
    is ordinary corruption (truncated zip, garbage bytes)."""
    message = str(err)
    if isinstance(err, RuntimeError) and "TorchScript" in message:
        return "it is a TorchScript archive, i.e. a program"
    if not isinstance(err, pickle.UnpicklingError):
        return None
    named = re.search(r"GLOBAL (\S+)", message)  # torch >= 2.4 names the first forbidden callable
    callables = [named.group(1)] if named else [c for c in pickle_globals(path) if not c.startswith(_PLAIN)]
    if not callables:
        return None
    return f"its pickle calls {', '.join(dict.fromkeys(callables))}"


def pickle_globals(path: str | os.PathLike) -> list[str]:
    """The callables the pickles in a torch file import (GLOBAL, STACK_GLOBAL, INST opcodes), read
    with `pickletools` (a parser: nothing is imported or run). Best effort; [] for non-pickles."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: the pickle is `<name>/data.pkl`
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.endswith(".pkl"):
                        with archive.open(name) as stream:
                            found += _stream_globals(stream)[0]
        else:  # a raw pickle, or torch's legacy format (a few pickles in a row, then raw storages)
            with open(path, "rb") as stream:
                for _ in range(8):
                    globals_, complete = _stream_globals(stream)
                    found += globals_
                    if not complete or not stream.peek(1):
                        break
    except (OSError, zipfile.BadZipFile):
        pass
    return found


_NO_PUSH = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}


def _stream_globals(stream: Any) -> tuple[list[str], bool]:
    """(callables imported by the next pickle in `stream`, whether it parsed to its STOP); a pickle
    that does not parse to its end counts as garbage and reports nothing."""
    found: list[str] = []
    pushed: list[str | None] = []  # what each opcode pushed, when a string (STACK_GLOBAL's arguments)
    memo: dict[Any, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                module_and_name = pushed[-2:]
                known = len(module_and_name) == 2 and all(isinstance(x, str) for x in module_and_name)
                found.append(".".join(module_and_name) if known else "a Python callable")
            elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            if name not in _NO_PUSH and name not in ("GET", "BINGET", "LONG_BINGET"):
                is_text = isinstance(arg, str) and ("UNICODE" in name or "STRING" in name)
                pushed.append(arg if is_text else None)
    except Exception:  # garbage, or the raw bytes after the last pickle
        return [], False
    return found, True


def load_torch_file(path: str | os.PathLike, what: str = "Weights file", fix: str | None = None) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; raises `UntrustedWeightsError` for a file that
    needs code, `WeightsFileError` for an unreadable one. `fix` replaces the conversion advice."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, zipfile errors...
        reason = refusal_reason(err, path)
        if reason is not None:
            raise UntrustedWeightsError(
                untrusted_message(path, what, reason, fix, torchscript="TorchScript" in reason)) from None
        raise WeightsFileError(
            f"{what} '{path}' cannot be read ({type(err).__name__}: {_first_line(err)}): it is truncated, corrupt "
            "or not a PyTorch weights file. Download or copy it again."
        ) from err


def load_state_dict_file(path: str | os.PathLike, what: str = "Weights file") -> dict[str, Tensor]:
    """A state dict from `.safetensors` or a plain torch file (a `{"state_dict": ...}` wrapper is unwrapped)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises SafetensorError, OSError...
            raise WeightsFileError(
                f"{what} '{path}' cannot be read as safetensors ({type(err).__name__}: {_first_line(err)}): "
                "it is truncated or corrupt. Download or copy it again."
            ) from err
    loaded = load_torch_file(path, what)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsFileError(
            f"{what} '{path}' holds a {type(loaded).__name__}, not a state dict (a dict of tensors). "
            "Save the model's state_dict() instead."
        )
    return loaded


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
