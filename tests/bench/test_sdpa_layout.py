"""bench/sdpa_layout.py: the four q/k/v layouts compute one attention (checked before timing), and a layout that
does not is refused."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import sdpa_layout  # noqa: E402


def test_layouts_agree_and_are_all_timed():
    results = sdpa_layout.main(["--batch", "2", "--tokens", "5", "--heads", "2", "--head-dim", "4", "--dtype", "fp32",
                                "--repeats", "2"])
    assert set(results) == set(sdpa_layout.layouts(2))
    assert all(len(samples.wall) == 2 for samples in results.values())


def test_layouts_match_attention_computed_by_hand():
    b, n, heads, d = 2, 5, 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, 3 * heads * d, generator=g, dtype=torch.float64)
    grad_out = torch.randn(b, heads, n, d, generator=g, dtype=torch.float64)
    q, k, v = (p.transpose(1, 2) for p in x.view(b, n, 3, heads, d).unbind(2))
    expected = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v
    for name, layout in sdpa_layout.layouts(heads).items():
        out, grad = sdpa_layout.attention_step(layout, x, grad_out)
        torch.testing.assert_close(out, expected, msg=name)
        assert grad().shape == x.shape, name


def test_a_layout_that_swaps_keys_and_values_is_refused():
    heads = 2
    x = torch.randn(2, 5, 3 * heads * 4, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, heads, 5, 4, generator=torch.Generator().manual_seed(2))

    def swapped(t):
        (q, k, v), gradient = sdpa_layout.layouts(heads)["separate (diffusers)"](t)
        return (q, v, k), gradient

    candidates = {**sdpa_layout.layouts(heads), "swapped": swapped}
    with pytest.raises(SystemExit, match="swapped does not compute"):
        sdpa_layout.check_same_attention(candidates, x, grad_out)
