"""Markers shared by test modules."""

from __future__ import annotations

import pytest

# A test that needs most of a card's memory (an 8B model and its fp32 twin, fp64 references at the checkpoint
# shape). conftest.py makes `-n N` schedule with --dist loadgroup, so xdist gives every test of this group to
# one worker, one after another: side by side they ran an 80 GB card out of memory.
WHOLE_CARD = pytest.mark.xdist_group("whole-card")
