"""Fixtures of the latents tests: one local Ray instance for the whole session (starting one takes seconds)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray instance with 2 CPUs, shared by every test that asks for it; yields its address (for a
    ``RAY_ADDRESS`` of subprocesses). ``run_ray`` in this process finds it initialised and leaves it running."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
