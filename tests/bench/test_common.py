"""bench/common.py helpers: interleaving order, samples recorded, child-process peak memory, tables.
(No timing assertions: the bench scripts report timings, tests only check the plumbing.)"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def test_interleave_alternates_order_skips_warmup_and_takes_returned_samples():
    calls = []
    own = common.Samples(wall=[1.0, 2.0], cpu=[0.5, 0.5])
    results = common.interleave(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or own}, repeats=2, warmup=1
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]  # reversed on odd rounds
    assert len(results["a"].wall) == 2 and len(results["a"].cpu) == 2  # warmup round not recorded
    assert results["b"].wall == [1.0, 2.0, 1.0, 2.0]  # a candidate's own samples replace its duration
    assert results["b"].median == 1.5 and results["b"].spread().startswith("±")


def test_paired_ratio_cancels_a_drift_that_the_ratio_of_medians_keeps():
    # the machine slows down 2x halfway; "ours" is 10% faster than the peer in every round
    peer = common.Samples(wall=[1.1, 1.1, 1.1, 2.2, 2.2])
    ours = common.Samples(wall=[1.0, 1.0, 2.0, 2.0, 2.0])  # the slowdown reached ours one round earlier
    assert common.paired_ratio(peer, ours) == pytest.approx(1.1)
    assert common.ratio(peer.median, ours.median) == pytest.approx(0.55)  # what the medians alone say
    with pytest.raises(ValueError):
        common.paired_ratio(peer, common.Samples(wall=[1.0]))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_in_a_child_sees_a_transient_allocation(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'bench')!r})
        import numpy as np
        import common
        with common.peak_memory() as out:
            block = np.ones(64 * 2**20 // 8)  # 64 MiB, freed before the region ends
            del block
        common.child_result(out)
    """))
    out = common.run_child(script, [])
    assert 60 <= out["peak_mib"] <= 80
    assert out["peak_total_mib"] >= out["held_mib"] + out["peak_mib"] - 1


def test_markdown_table(capsys):
    common.print_table(["name", "value"], [["x", 1234.5], ["longer name", 0.01234], ["nan", float("nan")]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= {"|", "-"}
    assert "1234" in lines[2] and "0.0123" in lines[3] and "n/a" in lines[4]
    assert len({len(line) for line in lines}) == 1  # aligned columns
