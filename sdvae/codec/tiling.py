"""Exact, memory-bounded tiled encode/decode for ``diffusers.AutoencoderKL``.

diffusers' own tiling runs the whole network on overlapping tiles and blends them: every tile gets its
own GroupNorm statistics and its own attention context, so the result drifts from the untiled output.
Here the network is instead executed layer by layer, as a sequence of *tiled conv passes* over stored
activations:

* each 3×3 (or 1×1) conv is run tile by tile, reading its input tile with the halo the kernel needs
  and zero-padding only at the true image border, so every conv output is exact;
* the pointwise GroupNorm + activation in front of a conv is applied to each input tile with the
  *global* statistics of the whole activation, accumulated while that activation was written;
* the mid-block attention (at 1/8 resolution) stays global: keys and values of the whole activation are
  held, and queries run in bands of rows, each attending to every key.

Activations live in :class:`TensorStore` objects: a tensor in RAM when small, a raw file on disk
otherwise (page cache is not counted in the process RSS), so peak memory is bounded by the tile
budget and the size of the lowest-resolution activation, not by the image size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from sdvae.codec.spill import SpillFiles, TensorStore

TILE_BYTES = 64 << 20  # budget for the largest (fp32) input or output tile of one conv
DISK_THRESHOLD = 256 << 20  # activations larger than this are kept on disk
AUTO_TILE_PIXELS = 1024 * 1024  # `--tile auto` tiles images with more pixels than this
_POINTWISE_ACTS = (nn.SiLU, nn.ReLU, nn.GELU, nn.Mish)  # what get_activation can return


def should_tile(height: int, width: int, *, max_pixels: int = AUTO_TILE_PIXELS) -> bool:
    """Whether ``--tile auto`` should tile an H×W image (pixels, not latents): above ``max_pixels``.

    Untiled decoding of a 1024² image with the SD VAE already takes about 5 GB on CPU.
    """
    return height * width > max_pixels


def _tiles(out_h: int, out_w: int, pixels: int) -> Iterator[tuple[int, int, int, int]]:
    """Output tiles (y0, y1, x0, x1) of at most ~``pixels`` pixels each, row-major."""
    if pixels >= out_w * min(out_h, 16):
        # Full-width bands of >= 16 rows: the halo costs little and disk I/O is one range per tile.
        tile_w, tile_h = out_w, max(1, pixels // out_w)
    else:
        tile_w = max(1, min(out_w, math.isqrt(pixels)))
        tile_h = max(1, min(out_h, pixels // tile_w))
    for y in range(0, out_h, tile_h):
        for x in range(0, out_w, tile_w):
            yield y, min(y + tile_h, out_h), x, min(x + tile_w, out_w)


def _unsupported(module: nn.Module, why: str) -> NotImplementedError:
    return NotImplementedError(f"exact tiling does not support {type(module).__name__}: {why}")


def _plain_self_attention(attn: Attention) -> bool:
    """Whether ``attn`` computes exactly what :meth:`_Runner.attention`'s banded pass does: diffusers'
    default SDPA processor (or the classic one, the same math) for plain self-attention."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    head_dim = attn.inner_dim // attn.heads
    return (type(attn.processor) in (AttnProcessor, AttnProcessor2_0) and attn.norm_q is None
            and attn.norm_k is None and attn.add_k_proj is None and not attn.only_cross_attention
            and math.isclose(attn.scale, head_dim ** -0.5) and not attn.training)


class _Runner:
    """Executes Encoder/Decoder modules as tiled passes; owns the spill directory."""

    def __init__(self, vae: nn.Module, tile_bytes: int, disk_threshold: int, tmp_dir: str | os.PathLike[str] | None):
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tile_bytes = tile_bytes
        self.disk_threshold = disk_threshold
        self.spill = SpillFiles(tmp_dir)

    def store(self, channels: int, height: int, width: int) -> TensorStore:
        big = channels * height * width * self.dtype.itemsize > self.disk_threshold
        return TensorStore(channels, height, width, self.dtype, spill=self.spill if big else None)

    def conv(self, x: TensorStore, conv: nn.Conv2d, *, norm: nn.GroupNorm | None = None,
             act: nn.Module | None = None, upsample: bool = False, extra_pad: int = 0,
             residual: TensorStore | None = None, shortcut: nn.Conv2d | None = None,
             scale: float = 1.0, free: bool = False) -> TensorStore:
        """One tiled pass: ``(residual' + conv(pad(up(act(norm(x)))))) / scale`` → a new store.

        Args:
            x: input activation (its statistics feed ``norm``).
            conv: the conv whose weights/stride/padding are used.
            norm, act: pointwise prefix (GroupNorm with x's global stats, then the activation).
            upsample: nearest ×2 before the conv (Upsample2D).
            extra_pad: extra zero rows/columns at the bottom/right (Downsample2D's F.pad (0,1,0,1)).
            residual, shortcut, scale: ResnetBlock2D's skip: residual tile through the optional 1×1
                shortcut, added, then divided by ``output_scale_factor``.
            free: close ``x`` afterwards (each activation is deleted as soon as nothing needs it).
        """
        if conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            raise _unsupported(conv, "only plain zero-padded convs with dilation 1 and groups 1")
        cout, cin, kh, kw = conv.weight.shape
        (sh, sw), (pt, pl) = conv.stride, conv.padding
        _, h, w = x.shape
        f = 2 if upsample else 1
        in_h, in_w = h * f, w * f  # size of the conv's actual input
        out_h = (in_h + 2 * pt + extra_pad - kh) // sh + 1
        out_w = (in_w + 2 * pl + extra_pad - kw) // sw + 1
        prefix = None
        if norm is not None:
            if not isinstance(norm, nn.GroupNorm):
                raise _unsupported(norm, "only GroupNorm")
            prefix = self._norm_affine(x, norm)
        if act is not None and (norm is None or not isinstance(act, _POINTWISE_ACTS)):
            raise _unsupported(act, "only pointwise activations, after a GroupNorm")
        out = self.store(cout, out_h, out_w)
        # Bytes per output pixel of the largest fp32 tile: input (upsampled or strided) or output.
        per_pixel = 4 * max(cin * sh * sw, cout)
        for y0, y1, x0, x1 in _tiles(out_h, out_w, max(1, self.tile_bytes // per_pixel)):
            # Output rows [y0, y1) need input rows [y0*s - p, (y1-1)*s - p + k) (in upsampled coords).
            t, pad = self._load(x, y0 * sh - pt, (y1 - 1) * sh - pt + kh, x0 * sw - pl, (x1 - 1) * sw - pl + kw,
                                in_h, in_w, f, prefix, act)
            y = F.conv2d(t, conv.weight, conv.bias, stride=(sh, sw), padding=pad)
            del t
            if residual is not None:  # in place: y is a fresh tile; fp addition commutes, x/1 == x
                r = residual.read(y0, y1, x0, x1).to(self.device, self.dtype)
                y.add_(r if shortcut is None else shortcut(r))
                if scale != 1:
                    y.div_(scale)
            out.write(y0, x0, y)
        if free:
            x.close()
        return out

    def _norm_affine(self, x: TensorStore, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm over the whole of ``x`` folded into one per-channel affine (mul, add), (1, C, 1, 1)
        fp32 on the device: applied in fp32, as the norm kernels do, to any tile of ``x``."""
        c = x.shape[0]
        mean, var = x.group_stats(norm.num_groups)
        mul = torch.rsqrt(var + norm.eps) * (1 if norm.weight is None else norm.weight.detach().double().cpu())
        add = (0 if norm.bias is None else norm.bias.detach().double().cpu()) - mean * mul
        return mul.float().view(1, c, 1, 1).to(self.device), add.float().view(1, c, 1, 1).to(self.device)

    def _load(self, x: TensorStore, iy0: int, iy1: int, ix0: int, ix1: int, in_h: int, in_w: int, f: int,
              prefix: tuple[torch.Tensor, torch.Tensor] | None,
              act: nn.Module | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """The conv input region [iy0, iy1) × [ix0, ix1), prefix applied, and the zero padding still due.

        Returns:
            (tile, (pad_h, pad_w)): symmetric padding is left to ``conv2d`` (no copy of the tile);
            only asymmetric padding (image edges of a band, Downsample2D) is applied here.
        """
        cy0, cy1, cx0, cx1 = max(iy0, 0), min(iy1, in_h), max(ix0, 0), min(ix1, in_w)
        sy0, sx0 = cy0 // f, cx0 // f  # the source pixels behind the (upsampled) region
        t = x.read(sy0, (cy1 - 1) // f + 1, sx0, (cx1 - 1) // f + 1).to(self.device)
        if prefix is not None:  # pointwise, so it commutes with nearest upsampling: do it small
            t = t.float() * prefix[0]  # a fresh tensor: from here on in place is safe
            t.add_(prefix[1])
            if isinstance(act, nn.SiLU):
                F.silu(t, inplace=True)
            elif act is not None:
                t = act(t)
        t = t.to(self.dtype)
        if f > 1:
            t = F.interpolate(t, scale_factor=float(f), mode="nearest")
            t = t[:, :, cy0 - sy0 * f:cy1 - sy0 * f, cx0 - sx0 * f:cx1 - sx0 * f]
        # Zero padding comes after norm + act, exactly like the conv's own padding in the untiled net.
        top, bottom, left, right = cy0 - iy0, iy1 - cy1, cx0 - ix0, ix1 - cx1
        ph, pw = min(top, bottom), min(left, right)
        top, bottom, left, right = top - ph, bottom - ph, left - pw, right - pw
        # Channels-last input makes conv2d write channels-last output, the disk layout (F.pad would not).
        if top or bottom or left or right:
            n, c, h, w = t.shape
            padded = torch.empty((n, c, h + top + bottom, w + left + right), dtype=t.dtype, device=t.device,
                                 memory_format=torch.channels_last)
            padded[:, :, top:top + h, left:left + w] = t
            for rows, cols in ((slice(0, top), slice(None)), (slice(top + h, None), slice(None)),
                               (slice(None), slice(0, left)), (slice(None), slice(left + w, None))):
                padded[:, :, rows, cols] = 0  # only the border: the interior is written once
            return padded, (ph, pw)
        return t.contiguous(memory_format=torch.channels_last), (ph, pw)

    def resnet(self, x: TensorStore, block: nn.Module) -> TensorStore:
        """ResnetBlock2D (no temb, no up/down); consumes ``x``."""
        if not isinstance(block, ResnetBlock2D):
            raise _unsupported(block, "expected ResnetBlock2D")
        if block.upsample is not None or block.downsample is not None:
            raise _unsupported(block, "resnet up/down sampling")
        # The decoder's blocks say "group" rather than "default"; without temb both just apply norm2.
        if block.time_emb_proj is not None or block.time_embedding_norm == "scale_shift":
            raise _unsupported(block, "time embeddings")
        h = self.conv(x, block.conv1, norm=block.norm1, act=block.nonlinearity)
        y = self.conv(h, block.conv2, norm=block.norm2, act=block.nonlinearity, residual=x,
                      shortcut=block.conv_shortcut, scale=block.output_scale_factor, free=True)
        x.close()
        return y

    def attention(self, x: TensorStore, attn: nn.Module) -> TensorStore:
        """Mid-block self-attention over the whole activation, in bands of query rows; consumes ``x``.

        Attention is global, so every query needs every key and value: those two are computed band by
        band and held (2·C·H·W values, the least an exact pass can hold), then each band of queries is
        projected, attends to all of them and is written out with its residual. Nothing else of image
        size is in memory at once (diffusers' processor holds about six such tensors: input, normed,
        q, k, v, output). The math is diffusers' ``AttnProcessor2_0``; other processors (a user's
        custom one) run untiled on the whole activation instead.
        """
        if not isinstance(attn, Attention) or attn.spatial_norm is not None:
            raise _unsupported(attn, "expected Attention without spatial norm")
        c, h, w = x.shape
        if not _plain_self_attention(attn):
            t = x.read(0, h, 0, w).to(self.device).contiguous()  # the processor .view()s it
            x.close()
            y = attn(t)
            del t
            out = self.store(c, h, w)
            out.write(0, 0, y)
            return out
        heads = attn.heads
        prefix = None
        if attn.group_norm is not None:
            prefix = self._norm_affine(x, attn.group_norm)
        # Full-width bands of query rows; the fp32 tile budget bounds a band's (tokens, C) tensors.
        rows = max(1, self.tile_bytes // (4 * c * w))

        def tokens(y0: int, y1: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Rows [y0, y1) as (1, (y1-y0)·W, C): raw (the residual) and group-normed (the input)."""
            raw = x.read(y0, y1, 0, w).to(self.device)
            normed = raw if prefix is None else (raw.float() * prefix[0]).add_(prefix[1]).to(self.dtype)
            return raw, normed.flatten(2).transpose(1, 2)

        # The input is read and normed again for the queries: holding it would cost a third image-size tensor.
        key, value = (torch.empty((1, heads, h * w, proj.out_features // heads), dtype=self.dtype, device=self.device)
                      for proj in (attn.to_k, attn.to_v))
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            _, t = tokens(y0, y1)
            for store, proj in ((key, attn.to_k), (value, attn.to_v)):
                store[:, :, y0 * w:y1 * w] = proj(t).view(1, -1, heads, store.shape[-1]).transpose(1, 2)
            del t
        out = self.store(c, h, w)
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            raw, t = tokens(y0, y1)
            q = attn.to_q(t)
            del t
            q = q.view(1, -1, heads, q.shape[-1] // heads).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, key, value, dropout_p=0.0, is_causal=False)
            del q
            a = attn.to_out[0](a.transpose(1, 2).reshape(1, -1, heads * a.shape[-1]))
            y = a.transpose(1, 2).reshape(1, c, y1 - y0, w)
            del a
            if attn.residual_connection:
                y = y + raw
            if attn.rescale_output_factor != 1:
                y = y / attn.rescale_output_factor
            out.write(y0, 0, y)
        x.close()
        return out

    def mid(self, x: TensorStore, block: nn.Module) -> TensorStore:
        if not isinstance(block, UNetMidBlock2D):
            raise _unsupported(block, "expected UNetMidBlock2D")
        x = self.resnet(x, block.resnets[0])
        for attn, resnet in zip(block.attentions, block.resnets[1:], strict=True):
            if attn is not None:
                x = self.attention(x, attn)
            x = self.resnet(x, resnet)
        return x

    def block(self, x: TensorStore, block: nn.Module) -> TensorStore:
        """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then the optional down/up sampler."""
        if not isinstance(block, (DownEncoderBlock2D, UpDecoderBlock2D)):
            raise _unsupported(block, "expected DownEncoderBlock2D or UpDecoderBlock2D")
        for resnet in block.resnets:
            x = self.resnet(x, resnet)
        for down in getattr(block, "downsamplers", None) or []:
            if not isinstance(down, Downsample2D) or not down.use_conv or down.norm is not None:
                raise _unsupported(down, "only conv Downsample2D without norm")
            # padding=0 means diffusers pads (0, 1, 0, 1) itself before the stride-2 conv.
            x = self.conv(x, down.conv, extra_pad=1 if down.padding == 0 else 0, free=True)
        for up in getattr(block, "upsamplers", None) or []:
            if not isinstance(up, Upsample2D) or not up.use_conv or up.use_conv_transpose \
                    or not up.interpolate or up.norm is not None:
                raise _unsupported(up, "only nearest ×2 + conv Upsample2D without norm")
            x = self.conv(x, up.conv if up.name == "conv" else up.Conv2d_0, upsample=True, free=True)
        return x

    def encoder(self, x: TensorStore, enc: nn.Module) -> TensorStore:
        if not isinstance(enc, Encoder):
            raise _unsupported(enc, "expected diffusers' vae.Encoder")
        x = self.conv(x, enc.conv_in, free=True)
        for block in enc.down_blocks:
            x = self.block(x, block)
        x = self.mid(x, enc.mid_block)
        return self.conv(x, enc.conv_out, norm=enc.conv_norm_out, act=enc.conv_act, free=True)

    def decoder(self, x: TensorStore, dec: nn.Module) -> TensorStore:
        if not isinstance(dec, Decoder):
            raise _unsupported(dec, "expected diffusers' vae.Decoder")
        x = self.conv(x, dec.conv_in, free=True)
        x = self.mid(x, dec.mid_block)
        for block in dec.up_blocks:
            x = self.block(x, block)
        return self.conv(x, dec.conv_out, norm=dec.conv_norm_out, act=dec.conv_act, free=True)


def _run_batch(vae: nn.Module, x: torch.Tensor, body, tile_bytes: int, disk_threshold: int,
               tmp_dir: str | os.PathLike[str] | None) -> torch.Tensor:
    """Run ``body(runner, store) -> store`` on each image of the batch (GroupNorm is per image anyway)."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    out = None
    runner = _Runner(vae, tile_bytes, disk_threshold, tmp_dir)
    try:
        for i in range(x.shape[0]):
            item = x[i:i + 1].cpu()
            res = body(runner, TensorStore(*item.shape[1:], item.dtype, data=item))
            c, h, w = res.shape
            if out is None:
                out = torch.empty((x.shape[0], c, h, w), dtype=runner.dtype)
            out[i] = res.read(0, h, 0, w)[0]
            res.close()
    finally:
        runner.spill.close()  # also the files of stores left open by an exception
    return out.to(x.device)


@torch.inference_mode()
def tiled_encode(vae: nn.Module, images: torch.Tensor, *, tile_bytes: int = TILE_BYTES,
                 disk_threshold: int = DISK_THRESHOLD, tmp_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """Exact tiled equivalent of ``vae.quant_conv(vae.encoder(images))`` with bounded memory.

    Args:
        vae: a ``diffusers.AutoencoderKL`` (any dtype; CPU or CUDA: tiles go to its device, activations
            stay in CPU RAM or on disk).
        images: (B, C, H, W) in [-1, 1]; H and W multiples of the downsampling factor f.
        tile_bytes: budget for the largest fp32 tile of one conv pass (bounds the working memory).
        disk_threshold: activations larger than this many bytes are kept in files, not RAM.
        tmp_dir: where those files go (default: the system temp directory).

    Returns:
        Moments (B, 2·latent_channels, H/f, W/f) (mean and logvar, unclamped), in the model's dtype,
        on the device of ``images``.

    Raises:
        NotImplementedError: the model contains a module this executor does not handle (it is named).
    """
    def body(runner: _Runner, x: TensorStore) -> TensorStore:
        x = runner.encoder(x, vae.encoder)
        if vae.quant_conv is not None:
            x = runner.conv(x, vae.quant_conv, free=True)
        return x

    return _run_batch(vae, images, body, tile_bytes, disk_threshold, tmp_dir)


@torch.inference_mode()
def tiled_decode(vae: nn.Module, z: torch.Tensor, *, tile_bytes: int = TILE_BYTES,
                 disk_threshold: int = DISK_THRESHOLD, tmp_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """Exact tiled equivalent of ``vae.decode(z).sample`` with bounded memory.

    Args:
        vae: a ``diffusers.AutoencoderKL`` (see :func:`tiled_encode`).
        z: (B, latent_channels, h, w) unscaled latents (any h, w ≥ 1).
        tile_bytes: budget for the largest fp32 tile of one conv pass.
        disk_threshold: activations larger than this many bytes are kept in files, not RAM.
        tmp_dir: where those files go (default: the system temp directory).

    Returns:
        Images (B, C, h·f, w·f), nominally in [-1, 1] (not clamped), in the model's dtype, on the device
        of ``z``.

    Raises:
        NotImplementedError: the model contains a module this executor does not handle (it is named).
    """
    def body(runner: _Runner, x: TensorStore) -> TensorStore:
        if vae.post_quant_conv is not None:
            x = runner.conv(x, vae.post_quant_conv, free=True)
        return runner.decoder(x, vae.decoder)

    return _run_batch(vae, z, body, tile_bytes, disk_threshold, tmp_dir)
