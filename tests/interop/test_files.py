"""Streaming weights I/O of the converter (ldmkit.interop.files): tensors are views of the memory-mapped input, the
writer matches safetensors' own reader, upcasts fp16 one tensor at a time, and hands the input's pages back after
writing them (peak RSS stays far below the file's size) without losing a page a caller modified."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmkit.interop.files import MAPPED, LazyTensors, write_safetensors

LINUX_PROC = sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def test_lazy_tensors_are_views_and_the_writer_round_trips(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 5), "b.half": torch.randn(7).half(), "c": torch.arange(4), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    lazy = LazyTensors([tmp_path / "in.safetensors"])
    assert lazy["b.half"].dtype == torch.float16  # the file's dtype: upcasting happens when writing
    assert lazy["a"].untyped_storage().nbytes() == 15 * 4  # a view of its bytes in the map, not a loaded copy
    with MAPPED.session():
        write_safetensors(tmp_path / "same.safetensors", lazy, {"k": "v"})
        write_safetensors(tmp_path / "up.safetensors", lazy, upcast=True)
    same, up = load_file(str(tmp_path / "same.safetensors")), load_file(str(tmp_path / "up.safetensors"))
    assert same.keys() == tensors.keys() and all(torch.equal(same[k], v) and same[k].dtype == v.dtype for k, v in tensors.items())
    assert up["b.half"].dtype == torch.float32 and torch.equal(up["b.half"], tensors["b.half"].float())
    assert up["c"].dtype == torch.int64 and up["a"].dtype == torch.float32


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux /proc and madvise")
def test_writing_releases_the_input_pages_and_keeps_modified_ones(tmp_path) -> None:
    count, mib = 16, 4  # a 64 MiB input in 4 MiB tensors
    save_file({f"t{i:02d}": torch.full((mib * 2**18,), float(i)) for i in range(count)}, str(tmp_path / "in.safetensors"))
    lazy = LazyTensors([tmp_path / "in.safetensors"])
    views = dict(lazy)
    views["t03"][5] = -1.0  # a caller's change to a mapped tensor (a private copy-on-write page)
    with MAPPED.session():
        assert sum(float(v.sum()) for v in views.values()) != 0  # every page read: RSS holds the file
        touched = _status_mib("VmRSS")
        MAPPED.release_all()
        assert touched - _status_mib("VmRSS") > count * mib / 2  # handed back; the views stay valid (below)
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _status_mib("VmRSS")
        write_safetensors(tmp_path / "out.safetensors", views)
        grown = _status_mib("VmHWM") - before
    assert grown < count * mib / 2, f"peak RSS grew by {grown:.0f} MiB writing a {count * mib} MiB file"  # ~1 tensor
    assert float(views["t03"][5]) == -1.0 and float(views["t03"][6]) == 3.0  # the modified page was kept
    out = load_file(str(tmp_path / "out.safetensors"))
    assert float(out["t03"][5]) == -1.0 and all(float(out[f"t{i:02d}"][-1]) == i for i in range(count))
