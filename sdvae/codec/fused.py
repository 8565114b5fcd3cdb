"""The fused eager path of a low-precision :class:`~sdvae.codec.codec.Codec`: the same modules and weights,
fewer passes over memory and fewer multiply-adds.

diffusers' ``Encoder`` / ``Decoder`` are walked block by block (as :mod:`sdvae.codec.tiling` walks them),
with three changes that keep the math and change only the rounding:

* GroupNorm → SiLU writes the activation in place, and a ResNet block adds its residual in place, so the
  non-convolution work makes one pass over memory fewer each (on CPU it is about a fifth of the time);
* each nearest-×2 upsampling conv runs at the low resolution in its sub-pixel form: a 3×3 conv over the
  ×2-upsampled input equals, for each of the four output phases, a 2×2 conv over the input with summed
  kernel taps. The four phases are one conv with 4× the output channels, interleaved into the output: 16
  instead of 36 multiply-adds per output pixel and channel, and the upsampled input is never materialised.
  The summed taps are formed in fp32 and rounded to the computing precision once;
* convolutions are the modules' own calls (hooks and layouts as elsewhere), attention is the module.
* no padded copies: the sub-pixel convs pad inside the conv, and the encoder's last ResNet before each
  ``Downsample2D`` writes its output into the zero-bordered buffer the strided conv reads.

A structure it does not know (custom blocks, time embeddings, other upsamplers) makes :func:`fused_path`
return None and the Codec calls the modules, as fp32 always does (fp32 stays diffusers' bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


def _norm_act(x: torch.Tensor, norm: nn.Module, act: nn.Module) -> torch.Tensor:
    """``act(norm(x))`` with the activation written into the normalised tensor."""
    y = norm(x)
    return F.silu(y, inplace=True) if isinstance(act, nn.SiLU) else act(y)


def _resnet(x: torch.Tensor, block: ResnetBlock2D, out: torch.Tensor | None = None) -> torch.Tensor:
    """ResnetBlock2D without temb or resampling (eval: dropout is the identity); the residual added in place,
    or into ``out`` (a view of the right shape) when given."""
    h = block.conv1(_norm_act(x, block.norm1, block.nonlinearity))
    h = block.conv2(_norm_act(h, block.norm2, block.nonlinearity))
    h = torch.add(h, block.conv_shortcut(x) if block.conv_shortcut is not None else x, out=h if out is None else out)
    return h if block.output_scale_factor == 1 else h.div_(block.output_scale_factor)


def _bottom_right_padded(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (B, channels, H+1, W+1) buffer in ``x``'s layout whose last row and column are zeros, its top-left
    (B, channels, H, W) view): a block's last output written into the view is Downsample2D's padded input
    without a padded copy."""
    b, _, h, w = x.shape
    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
    padded = torch.empty((b, channels, h + 1, w + 1), dtype=x.dtype, device=x.device, memory_format=layout)
    padded[:, :, h].zero_()
    padded[:, :, :h, w].zero_()
    return padded, padded[:, :, :h, :w]


def _mid(x: torch.Tensor, block: UNetMidBlock2D) -> torch.Tensor:
    x = _resnet(x, block.resnets[0])
    for attn, resnet in zip(block.attentions, block.resnets[1:], strict=True):
        if attn is not None:
            x = attn(x)
        x = _resnet(x, resnet)
    return x


def _channels_last(t: torch.Tensor) -> bool:
    """Laid out channels-last and not also plain contiguous (1×1 images and single channels are both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def subpixel_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 3×3 conv after a nearest ×2 upsampling, as four 2×2 kernels stacked on the output channels.

    Output pixel (2i+a, 2j+b) of ``conv(upsample(x))`` reads input rows i-1, i, i (a = 0) or i, i, i+1 (a = 1),
    and the same for columns: so taps that land on the same input pixel are summed, giving for phase (a, b)
    the 2×2 kernel over padded-input window (i+a, j+b).

    Returns:
        weight (4·O, I, 2, 2), phases in the order (0,0), (0,1), (1,0), (1,1), in the conv's dtype and
        layout; bias (4·O,) or None.
    """
    w = conv.weight.to(torch.promote_types(conv.weight.dtype, torch.float32))  # sums in fp32 at least

    def taps(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        k0, k1, k2 = (t.select(dim, i) for i in range(3))
        return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)

    kernels = [col for row in taps(w, 2) for col in taps(row, 3)]
    weight = torch.cat(kernels).to(conv.weight.dtype)
    if _channels_last(conv.weight):
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    return weight, bias


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(nearest_upsample_x2(x))`` (3×3, padding 1) from :func:`subpixel_weights`.

    Args:
        x: (B, I, H, W).
        weight, bias: :func:`subpixel_weights` of the conv.

    Returns:
        (B, O, 2H, 2W), in ``x``'s layout.
    """
    b, _, h, w = x.shape
    o = weight.shape[0] // 4
    phases = F.conv2d(x, weight, bias, padding=1)  # (B, 4·O, H+1, W+1); the conv pads: no padded copy
    layout = torch.channels_last if _channels_last(x) or (x.is_contiguous() and _channels_last(weight)) \
        else torch.contiguous_format  # x of 1×1 pixels is both: the weights' layout decides
    out = torch.empty((b, o, 2 * h, 2 * w), dtype=phases.dtype, device=phases.device, memory_format=layout)
    # (B, O, H, 2, W, 2) over the same storage, whichever the layout: phase (a, b) fills [:, :, :, a, :, b].
    grid = out.unflatten(3, (w, 2)).unflatten(2, (h, 2))
    for k, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        grid[:, :, :, a, :, c] = phases[:, k * o:(k + 1) * o, a:a + h, c:c + w]
    return out


class FusedPath:
    """A VAE's encoder and decoder on the fused path (see the module docstring); the sub-pixel kernels are
    formed once, here. Build it with :func:`fused_path`, which checks the structure first."""

    def __init__(self, vae: nn.Module):
        self.vae = vae
        self._up = {id(up.conv): subpixel_weights(up.conv)
                    for block in vae.decoder.up_blocks for up in block.upsamplers or []}

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        """``vae.encoder(x)``: images (B, C, H, W) → moments (B, 2c, H/f, W/f) before ``quant_conv``."""
        enc = self.vae.encoder
        x = enc.conv_in(x)
        for block in enc.down_blocks:
            down = block.downsamplers[0] if block.downsamplers else None  # diffusers' blocks have at most one
            pad_ahead = down is not None and down.padding == 0 and len(block.resnets) > 0
            for j, resnet in enumerate(block.resnets):
                if pad_ahead and j == len(block.resnets) - 1:
                    padded, view = _bottom_right_padded(x, resnet.out_channels)
                    _resnet(x, resnet, out=view)
                    x = padded  # Downsample2D's F.pad(x, (0, 1, 0, 1)), without the copy
                else:
                    x = _resnet(x, resnet)
            if down is not None:
                x = down.conv(x if down.padding != 0 or pad_ahead else F.pad(x, (0, 1, 0, 1)))
        x = _mid(x, enc.mid_block)
        return enc.conv_out(_norm_act(x, enc.conv_norm_out, enc.conv_act))

    def decoder(self, z: torch.Tensor) -> torch.Tensor:
        """``vae.decoder(z)``: latents (B, c, h, w) after ``post_quant_conv`` → images (B, C, h·f, w·f)."""
        dec = self.vae.decoder
        x = _mid(dec.conv_in(z), dec.mid_block)
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x = _resnet(x, resnet)
            for up in block.upsamplers or []:
                x = upsample_conv(x, *self._up[id(up.conv)])
        return dec.conv_out(_norm_act(x, dec.conv_norm_out, dec.conv_act))


def _known_resnet(block: nn.Module) -> bool:
    return (isinstance(block, ResnetBlock2D) and block.upsample is None and block.downsample is None
            and block.time_emb_proj is None and block.time_embedding_norm != "scale_shift")


def _known_mid(block: nn.Module) -> bool:
    return isinstance(block, UNetMidBlock2D) and all(_known_resnet(r) for r in block.resnets)


def _known_upsampler(up: nn.Module) -> bool:
    return (isinstance(up, Upsample2D) and up.use_conv and not up.use_conv_transpose and up.interpolate
            and up.norm is None and up.name == "conv" and isinstance(up.conv, nn.Conv2d)
            and up.conv.kernel_size == (3, 3) and up.conv.padding == (1, 1) and up.conv.stride == (1, 1)
            and up.conv.dilation == (1, 1) and up.conv.groups == 1 and up.conv.padding_mode == "zeros")


def _known_downsampler(down: nn.Module) -> bool:
    return isinstance(down, Downsample2D) and down.use_conv and down.norm is None


def fused_path(vae: nn.Module) -> FusedPath | None:
    """:class:`FusedPath` for a VAE whose encoder and decoder are diffusers' plain ones, else None."""
    enc, dec = getattr(vae, "encoder", None), getattr(vae, "decoder", None)
    if not isinstance(enc, Encoder) or not isinstance(dec, Decoder) or not isinstance(dec.conv_norm_out, nn.GroupNorm):
        return None
    blocks_ok = all(isinstance(b, DownEncoderBlock2D) and all(_known_resnet(r) for r in b.resnets)
                    and all(_known_downsampler(d) for d in b.downsamplers or []) for b in enc.down_blocks) \
        and all(isinstance(b, UpDecoderBlock2D) and all(_known_resnet(r) for r in b.resnets)
                and all(_known_upsampler(u) for u in b.upsamplers or []) for b in dec.up_blocks)
    if not (blocks_ok and _known_mid(enc.mid_block) and _known_mid(dec.mid_block)):
        return None
    return FusedPath(vae)
