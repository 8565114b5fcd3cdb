"""Fixtures of the codec tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Thousands of tiny convs: a second thread only adds sync cost (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
