"""bench/bf16_cpu_attention.py: both candidates run and are timed on each size, their errors against float64 are
measured (small), and the table says which sizes `ldmkit.nn.attention.attention` sends to the bf16 path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bf16_cpu_attention  # noqa: E402

from ldmkit.nn.attention import BF16_CPU_ATTENTION_MAX_SCORES  # noqa: E402


def test_bench_times_both_and_measures_their_error():
    rows = bf16_cpu_attention.main(["--batch", "1", "--heads", "2", "--head-dim", "8", "--rounds", "2",
                                    "--sizes", "4x5", "6x6"])
    assert [r[0] for r in rows] == ["4 x 5", "6 x 6"]
    for size, takes_it, ours_ms, sdpa_ms, paired, ours_err, sdpa_err in rows:
        assert takes_it == (int(size.split(" x ")[0]) * int(size.split(" x ")[1]) <= BF16_CPU_ATTENTION_MAX_SCORES)
        assert ours_ms > 0 and sdpa_ms > 0 and paired > 0
        assert 0 < float(ours_err) < 1e-2 and 0 < float(sdpa_err) < 1e-2
