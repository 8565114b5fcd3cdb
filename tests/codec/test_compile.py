"""``Codec(compile=...)``: the encoder and decoder modules go through torch.compile, one graph per input
shape (reused afterwards), the first call of each timed in ``compile_seconds`` and ``notes``; tiled runs
and the fp32 fallback stay eager."""

from __future__ import annotations

import pytest
import torch

from sdvae.codec.codec import Codec
from sdvae.model.build import build_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/codec/conftest.py


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Graphs compiled by one test are not reused by the next (and count towards no recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_compiled_codec_matches_eager_and_reuses_its_graphs(test_vae) -> None:
    """The ``eager`` backend: dynamo captures the modules' graphs (the part that decides reuse), fast."""
    codec = Codec(test_vae, compile="eager", tile="off")
    plain = Codec(build_preset("test"), tile="off")
    x = _images(2, 32, 24)
    out, enc = codec.roundtrip(x)
    ref, ref_enc = plain.roundtrip(x)
    torch.testing.assert_close(enc.mean, ref_enc.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert set(codec._compiled) == {"encoder", "decoder"}
    assert len(codec.notes) == 2 and codec.compile_seconds > 0
    assert "encoder graph for (2, 3, 32, 24)" in codec.notes[0] and "decoder graph for (2, 4, 4, 3)" in codec.notes[1]
    spent = codec.compile_seconds
    codec.roundtrip(_images(2, 32, 24, seed=1))  # same shapes: the same graphs, nothing new to compile
    assert codec.compile_seconds == spent and len(codec.notes) == 2
    codec.encode(_images(1, 32, 24))  # a new shape: one more graph
    assert len(codec.notes) == 3 and "encoder graph for (1, 3, 32, 24)" in codec.notes[2]
    assert plain.compile_seconds == 0 and plain._compiled == {}


def test_tiled_runs_stay_eager(test_vae) -> None:
    codec = Codec(test_vae, compile="eager", tile="on")
    codec.roundtrip(_images(1, 16, 16))
    assert codec._compiled == {} and codec.notes == [] and codec.compile_seconds == 0


@pytest.mark.slow
def test_inductor_compiled_bf16_codec_is_within_bf16_tolerance(test_vae) -> None:
    """The real compiler (C++ code generation on CPU) in the default CPU layout and precision."""
    codec = Codec(test_vae, dtype="bf16", compile=True, tile="off")
    plain = Codec(build_preset("test"), dtype="bf16", tile="off")
    assert codec.compile_backend == "inductor" and codec.memory_format_name == "channels_last"
    x = _images(1, 32, 32)
    out, _ = codec.roundtrip(x)
    ref, _ = plain.roundtrip(x)
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert codec.compile_seconds > 0 and len(codec.notes) == 2
