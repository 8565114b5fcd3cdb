"""Exact tiled encode/decode: same output as the untiled model, whatever the tiling and storage."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from sdvae.codec import tiling
from sdvae.codec.spill import TensorStore
from sdvae.codec.tiling import should_tile, tiled_decode, tiled_encode

# (tile_bytes, disk_threshold): one tile per pass, in RAM; small 2-D tiles, every store on disk;
# full-width bands, big stores on disk and small ones in RAM.
SETTINGS = [(1 << 30, 1 << 30), (4096, 0), (100_000, 20_000)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/codec/conftest.py


def _untiled_encode(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    h = vae.encoder(x)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def _plain_vae() -> AutoencoderKL:
    """f2 model without quant convs or mid attention, 2 resnets per block, GroupNorm with 2 groups."""
    torch.manual_seed(1)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 12], layers_per_block=2, norm_num_groups=2, latent_channels=3,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    ).eval()


@pytest.fixture
def spy_stores(monkeypatch):
    """Records every store the runner creates, to check that tests really hit the disk path."""
    made: list[bool] = []

    class Spy(TensorStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.on_disk)

    monkeypatch.setattr(tiling, "TensorStore", Spy)
    return made


@pytest.mark.parametrize(("tile_bytes", "disk_threshold"), SETTINGS)
def test_decode_matches_untiled(test_vae, tile_bytes, disk_threshold, tmp_path, spy_stores):
    z = torch.randn(2, 4, 13, 21, generator=torch.Generator().manual_seed(0))
    out = tiled_decode(test_vae, z, tile_bytes=tile_bytes, disk_threshold=disk_threshold, tmp_dir=tmp_path)
    with torch.no_grad():
        ref = test_vae.decode(z).sample
    assert out.shape == ref.shape == (2, 3, 104, 168)
    assert (out - ref).abs().max().item() < 1e-4
    assert any(spy_stores) == (disk_threshold < 1 << 30)
    assert not any(tmp_path.iterdir())  # every spill file (and the spill folder) is gone


@pytest.mark.parametrize(("tile_bytes", "disk_threshold"), SETTINGS)
def test_encode_matches_untiled(test_vae, tile_bytes, disk_threshold):
    x = torch.rand(2, 3, 104, 168, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = tiled_encode(test_vae, x, tile_bytes=tile_bytes, disk_threshold=disk_threshold)
    with torch.no_grad():
        ref = _untiled_encode(test_vae, x)
    assert out.shape == ref.shape == (2, 8, 13, 21)
    assert (out - ref).abs().max().item() < 1e-4


def test_model_without_quant_convs_or_attention():
    vae = _plain_vae()
    x = torch.rand(1, 3, 14, 22, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(1, 3, 9, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_enc, ref_dec = _untiled_encode(vae, x), vae.decode(z).sample
    enc = tiled_encode(vae, x, tile_bytes=400, disk_threshold=0)
    dec = tiled_decode(vae, z, tile_bytes=400, disk_threshold=0)
    assert enc.shape == (1, 6, 7, 11) and dec.shape == (1, 3, 18, 10)
    assert (enc - ref_enc).abs().max().item() < 1e-4
    assert (dec - ref_dec).abs().max().item() < 1e-4


def test_diffusers_tiling_drifts_where_ours_does_not(test_vae):
    # The test preset's diffusers tiles are 64 px (8 latents) with blending; ours are tiny but exact.
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = test_vae.decode(z).sample
        test_vae.enable_tiling()
        try:
            theirs = test_vae.decode(z).sample
        finally:
            test_vae.disable_tiling()
    ours = tiled_decode(test_vae, z, tile_bytes=16_384, disk_threshold=0)
    assert (theirs - ref).abs().max().item() > 1e-2
    assert (ours - ref).abs().max().item() < 1e-4


def test_low_precision_stays_in_dtype(test_vae):
    z = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = test_vae.decode(z).sample
    vae = test_vae.to(torch.bfloat16)
    out = tiled_decode(vae, z.bfloat16(), tile_bytes=2048, disk_threshold=0)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # bf16 keeps ~3 significant digits; a wrong tiling would be off by O(1).
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_roundtrip_and_group_stats(on_disk, tmp_path):
    data = torch.randn(1, 6, 7, 9, generator=torch.Generator().manual_seed(6)) * 3 + 50  # mean >> std
    spill = tiling.SpillFiles(str(tmp_path))
    store = TensorStore(6, 7, 9, torch.float32, spill=spill if on_disk else None)
    assert store.on_disk == on_disk
    for y0, y1, x0, x1 in tiling._tiles(7, 9, 10):
        store.write(y0, x0, data[:, :, y0:y1, x0:x1])
    assert torch.equal(store.read(0, 7, 0, 9), data)
    assert torch.equal(store.read(2, 5, 3, 8), data[:, :, 2:5, 3:8])
    mean, var = store.group_stats(3)
    groups = data.double().view(3, -1)
    assert torch.allclose(mean, groups.mean(1).repeat_interleave(2), rtol=0, atol=1e-5)
    assert torch.allclose(var, groups.var(1, correction=0).repeat_interleave(2), rtol=1e-5, atol=0)
    store.close()
    # A closed store's file is reused by the next one; the folder goes when the spill files close.
    again = TensorStore(6, 7, 9, torch.float32, spill=spill if on_disk else None)
    again.write(0, 0, data + 1)
    assert torch.equal(again.read(0, 7, 0, 9), data + 1)
    again.close()
    spill.close()
    assert not any(tmp_path.iterdir())


def test_tiles_cover_output_exactly_once():
    for h, w, px in [(7, 9, 1), (7, 9, 10), (100, 30, 500), (5, 5, 10**6), (33, 2000, 5000)]:
        seen = torch.zeros(h, w, dtype=torch.int64)
        for y0, y1, x0, x1 in tiling._tiles(h, w, px):
            assert (y1 - y0) * (x1 - x0) <= max(px, 16 * w) or px >= h * w
            seen[y0:y1, x0:x1] += 1
        assert torch.equal(seen, torch.ones_like(seen))


def test_unsupported_module_is_named(test_vae):
    test_vae.decoder.conv_act = torch.nn.Softmax(dim=1)
    with pytest.raises(NotImplementedError, match="Softmax"):
        tiled_decode(test_vae, torch.zeros(1, 4, 4, 4))


def test_should_tile():
    assert not should_tile(1024, 1024)
    assert should_tile(1024, 1032)
    assert should_tile(64, 64, max_pixels=1000)


def test_attention_runs_in_bands_of_queries(test_vae, monkeypatch):
    """The mid-block attention never projects all queries at once: each band attends to every key."""
    calls: list[tuple[int, int]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(tiling.F, "scaled_dot_product_attention", spy)
    z = torch.randn(1, 4, 13, 21, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = test_vae.decode(z).sample
    calls.clear()  # the untiled reference goes through diffusers' processor, not tiling.F
    out = tiled_decode(test_vae, z, tile_bytes=4096, disk_threshold=0)
    assert (out - ref).abs().max().item() < 1e-4
    assert len(calls) > 1 and all(keys == 13 * 21 for _, keys in calls)
    assert sum(queries for queries, _ in calls) == 13 * 21 and max(q for q, _ in calls) < 13 * 21


def test_custom_attention_processor_runs_untiled(test_vae):
    """A processor the banded pass does not know is run as it is, on the whole activation."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Halved(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return super().__call__(attn, hidden_states, *args, **kwargs) * 0.5

    z = torch.randn(1, 4, 9, 11, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = test_vae.decode(z).sample
        test_vae.decoder.mid_block.attentions[0].set_processor(Halved())
        ref = test_vae.decode(z).sample
    out = tiled_decode(test_vae, z, tile_bytes=4096, disk_threshold=0)
    assert (ref - plain).abs().max().item() > 1e-2  # the processor matters here
    assert (out - ref).abs().max().item() < 1e-4
