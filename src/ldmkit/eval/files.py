"""Writing eval outputs without losing anything: every file is written to a temporary sibling and moved
into place in one step (a crash never leaves half a file), and an existing file is never replaced unless
asked: `FileExistsError` instead (callers pick free names, `free_stem`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO


def write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, overwrite: bool = False) -> Path:
    """`write(f)` into a temporary file beside `path`, then move it to `path` atomically; with
    overwrite=False an existing `path` is left alone and FileExistsError raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and fails if `path` exists (os.replace would not)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    return write_file(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)


def free_stem(folder: Path, names: Callable[[str], Sequence[str]], claim: Callable[[str], str]) -> str:
    """The first suffix "" , "-2", "-3", ... for which none of `names(suffix)` exists in `folder`, claimed by
    creating the folder `claim(suffix)` (mkdir is atomic: two runs in one folder get different suffixes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        suffix = "" if n == 1 else f"-{n}"
        if any((folder / name).exists() for name in names(suffix)):
            continue
        try:
            (folder / claim(suffix)).mkdir()
        except FileExistsError:
            continue
        return suffix
    raise FileExistsError(f"{folder} already holds 10000 eval reports; write into a new folder")
