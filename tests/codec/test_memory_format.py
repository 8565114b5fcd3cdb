"""Channels-last in the Codec: the automatic rule, that it is really used, exact tiling in that layout, and
outputs within bf16 tolerance of the contiguous ones."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, make_photo
from sdvae.codec.codec import Codec, resolve_memory_format
from sdvae.model.build import build_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/codec/conftest.py

CL = torch.channels_last


def _photo(width: int, height: int, seed: int = 1) -> torch.Tensor:
    """(1,3,H,W) photo-like image in [-1, 1]."""
    return torch.from_numpy(make_photo(width, height, seed=seed)).permute(2, 0, 1).float()[None] / 127.5 - 1


@pytest.mark.parametrize(("device", "dtype", "expected"), [
    ("cpu", "bf16", "channels_last"), ("cpu", "fp16", "channels_last"), ("cpu", "fp32", "contiguous"),
    ("cuda", "bf16", "channels_last"), ("cuda", "fp32", "contiguous"), ("meta", "bf16", "contiguous")])
def test_auto_rule_per_device_and_precision(device: str, dtype: str, expected: str) -> None:
    assert resolve_memory_format("auto", device, dtype) == expected
    for explicit in ("channels_last", "contiguous"):
        assert resolve_memory_format(explicit, device, dtype) == explicit
    with pytest.raises(ValueError, match="memory_format must be one of"):
        resolve_memory_format("nhwc", device, dtype)


def test_default_bf16_codec_runs_channels_last_weights_and_inputs(test_vae) -> None:
    seen: list[bool] = []

    def record(module, args):  # the layout each conv of the computing model receives
        seen.append(args[0].is_contiguous(memory_format=CL) and not args[0].is_contiguous())

    codec = Codec(test_vae, dtype="bf16", tile="off")  # memory_format="auto"
    assert codec.memory_format_name == "channels_last"
    model = codec._model(torch.bfloat16)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=CL) for c in convs if c.weight.shape[-1] > 1)
    handles = [c.register_forward_pre_hook(record) for c in (model.encoder.conv_in, model.decoder.conv_out)]
    try:
        out, enc = codec.roundtrip(_photo(24, 16))
    finally:
        for h in handles:
            h.remove()
    assert seen == [True, True]
    assert out.is_contiguous() and enc.mean.is_contiguous()  # callers get ordinary tensors back
    assert not codec.master.encoder.conv_in.weight.is_contiguous(memory_format=CL)  # the fp32 master: as given


@pytest.mark.parametrize("tile_bytes", [4096, 1 << 30])  # small 2-D tiles; one tile per pass
def test_channels_last_tiling_equals_untiled_channels_last(test_vae, monkeypatch, tile_bytes: int) -> None:
    import functools

    from sdvae.codec import codec as codec_module

    for name in ("tiled_encode", "tiled_decode"):  # the Codec calls them with the default tile budget
        monkeypatch.setattr(codec_module, name, functools.partial(getattr(codec_module, name), tile_bytes=tile_bytes))
    x = _photo(56, 40)
    untiled = Codec(test_vae, memory_format="channels_last", tile="off")
    tiled = Codec(build_preset("test"), memory_format="channels_last", tile="on")
    ref, ref_enc = untiled.roundtrip(x)
    out, enc = tiled.roundtrip(x)
    for codec in (untiled, tiled):  # fp32: the master itself is laid out channels-last
        assert codec.master.decoder.conv_in.weight.is_contiguous(memory_format=CL)
    assert (enc.mean - ref_enc.mean).abs().max().item() < 1e-4
    assert (out - ref).abs().max().item() < 1e-4
    # bf16, channels-last: tiled against untiled, both in the layout and precision the default CPU path uses
    low_ref, _ = Codec(build_preset("test"), dtype="bf16", memory_format="channels_last", tile="off").roundtrip(x)
    low, _ = Codec(build_preset("test"), dtype="bf16", memory_format="channels_last", tile="on").roundtrip(x)
    assert (low - low_ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_channels_last_is_within_bf16_tolerance_of_contiguous_on_the_embedded_checkpoint() -> None:
    from sdvae.metrics.pixel import psnr, quantize
    from sdvae.model.load import load_vae

    ckpt = REPO / "checkpoints" / "sdvae-tiny-f8c4"
    x = _photo(64, 48)
    outs = {fmt: Codec(load_vae(ckpt), dtype="bf16", memory_format=fmt, tile="off").roundtrip(x)[0]
            for fmt in ("channels_last", "contiguous")}
    fp32, _ = Codec(load_vae(ckpt), dtype="fp32", tile="off").roundtrip(x)
    cl, contiguous = (quantize(outs[k]) for k in ("channels_last", "contiguous"))
    # 8-bit outputs of the two layouts: different summation orders of the same bf16 products
    assert float(psnr(cl, contiguous)[0]) > 45.0
    quality = {k: float(psnr(quantize(v), quantize(x))[0]) for k, v in outs.items()}
    assert abs(quality["channels_last"] - quality["contiguous"]) < 0.05
    assert float(psnr(cl, quantize(fp32))[0]) > 45.0
