"""The single-process reference runs that the layout tests (test_equivalence.py, test_deepspeed.py) compare with."""

from __future__ import annotations

import pytest

from tests.distributed import common


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = common.reference_run(common.tiny_config(), steps=common.STEPS + 2)
    assert all(h["grad_norm"] > common.GRAD_CLIP for h in ref["history"]), "clipping must be active"
    return ref


@pytest.fixture(scope="module")
def reference_after_k(reference) -> dict:
    """Parameters after exactly K steps (`reference` runs K + 2 for the resume tests)."""
    return common.reference_run(common.tiny_config(), steps=common.STEPS)["state"]
