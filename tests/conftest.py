"""Suite-wide test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """One intra-op thread for the whole suite: on a shared 2-core machine the tiny models here run several times
    faster that way (thread hand-offs cost more than they gain, and oversubscribed threads stall); no asserted number
    depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
