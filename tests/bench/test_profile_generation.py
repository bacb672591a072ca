"""``benchmarks/profile_generation.py`` on the tiny model: its chunks, and each forced decode scheduler runs."""

from __future__ import annotations

import pytest

import dms_perf.model.cache as cache_module


def test_profile_generation_times_chunks_and_forces_each_scheduler(tmp_path):
    from benchmarks.profile_generation import main

    rule = cache_module.decode_schedule
    out = tmp_path / "profile.json"
    report = main(["--model", "tiny", "--batch", "2", "--context", "64", "--new-tokens", "24", "--chunk", "2",
                   "--profile-steps", "1", "--ab-steps", "1", "--out", str(out)])
    # 23 decode steps: 1 profiled and 2 x (8 + 1) under the forced schedulers leave 4, timed in chunks of 2.
    assert [row["steps"] for row in report["chunks"]] == [2, 4]
    assert all(row["ms_per_step"] > 0 and row["kv_bytes"] > 0 for row in report["chunks"])
    assert {name: figures["ran"] for name, figures in report["schedulers"].items()} == {
        "per_head": "per_head", "balanced": "balanced"}
    assert cache_module.decode_schedule is rule  # the cache's rule is restored
    assert out.exists()


def test_profile_generation_refuses_a_profile_past_the_generation():
    from benchmarks.profile_generation import main

    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--new-tokens", "16", "--profile-steps", "1", "--ab-steps", "1"])
