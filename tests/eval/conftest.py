"""Fixtures of the evaluation tests: a codec of the `test` preset and a small image folder."""

from __future__ import annotations

import pytest

from sdvae.codec.codec import Codec


@pytest.fixture
def codec(test_vae) -> Codec:
    return Codec(test_vae)


