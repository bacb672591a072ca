"""Markers shared by test modules."""

from __future__ import annotations

import pytest

# A test that needs most of a card's memory (an 8B model and its fp32 twin, fp64 references at the checkpoint
# shape). pytest runs with --dist loadgroup (pyproject.toml), so xdist gives every test of this group to one
# worker, one after another: beside each other, or beside the others' tests, they ran a card out of memory.
WHOLE_CARD = pytest.mark.xdist_group("whole-card")
