"""Encode and decode images of any size with one model: padding, tiling, precision and device.

This is the layer the CLI (and other tools) use instead of calling ``vae.encode``/``vae.decode``
directly, so every command gets the same behaviour:

* sides that are not multiples of the downsampling factor are reflect-padded, then cropped back;
* large images go through :mod:`sdvae.codec.tiling` (exact: same output as untiled, bounded memory);
* fp16/bf16 runs fall back to fp32 when they produce non-finite values (what ``force_upcast`` is
  for), and say so in :attr:`Codec.notes`;
* weights and inputs are channels-last where that measures faster (``memory_format="auto"``, see
  :func:`resolve_memory_format`), and ``compile=True`` runs the encoder and decoder through
  ``torch.compile`` (one graph per input shape; worth it only for long jobs of fixed shapes).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from sdvae.codec import TILE_MODES
from sdvae.codec.fused import FusedPath, fused_path
from sdvae.codec.tiling import should_tile, tiled_decode, tiled_encode
from sdvae.heap import bounded_memory
from sdvae.images.channels import model_channels
from sdvae.model.dtypes import resolve_dtype, torch_dtype
from sdvae.model.info import downsample_factor

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # Codec(memory_format=...)


def resolve_memory_format(name: str, device: str | torch.device, dtype_name: str) -> str:
    """The layout ``name`` means for a computation in ``dtype_name`` on ``device``.

    ``auto`` is a fixed rule from measurements, not a timing at start-up:

    * CPU, bf16/fp16: ``channels_last``. Measured on a 2-core AVX512-BF16 EPYC at 512², bf16: ``sd`` preset
      decoder 1.19–1.44× faster, encoder 1.20–1.76×; ``tiny`` decoder 1.22×, encoder 1.44× (oneDNN's bf16
      convolutions are NHWC-native; contiguous inputs are reordered around every conv).
    * CPU, fp32: ``contiguous``. Same machine, fp32: the encoder is slower channels-last (``sd`` 0.95×,
      ``tiny`` 0.65×), the decoder faster (``sd`` 1.46×, ``tiny`` 1.08×): no single layout wins both.
    * CUDA, bf16/fp16: ``channels_last`` (cuDNN's tensor-core convolutions are NHWC-native; NVIDIA's and
      PyTorch's guidance, not measured in this repository yet). CUDA fp32: ``contiguous``.
    * anything else: ``contiguous``.

    Raises:
        ValueError: ``name`` is not one of :data:`MEMORY_FORMATS`.
    """
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {name!r}")
    if name != "auto":
        return name
    kind = torch.device(device).type
    if kind in ("cpu", "cuda") and dtype_name in ("bf16", "fp16"):
        return "channels_last"
    return "contiguous"


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom and right of images so both sides are multiples of ``factor``.

    Reflect padding (no hard edge for the convolutions to react to); a side shorter than or equal to its
    padding cannot be reflected, so that side is replicate-padded instead.

    Args:
        x: (B,C,H,W) or (C,H,W) float tensor.
        factor: the multiple, ≥ 1 (the model's downsampling factor).

    Returns:
        The padded tensor (..., ceil(H/f)*f, ceil(W/f)*f) (``x`` itself when nothing is needed) and the
        original (H, W) for :func:`crop_to`.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if x.dim() not in (3, 4):
        raise ValueError(f"pad_to_multiple expects (B,C,H,W) or (C,H,W), got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    if pad_w:
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < width else "replicate")
    if pad_h:
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < height else "replicate")
    return x, (height, width)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left (H, W) of ``x`` (..., H', W') (a view)."""
    height, width = size
    if height > x.shape[-2] or width > x.shape[-1]:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to a larger size {(height, width)}")
    return x[..., :height, :width]


def _cast(model: AutoencoderKL, *args) -> AutoencoderKL:
    """``model.to(*args)`` through torch's ``Module.to``: diffusers' override logs a warning about
    "modules that should be kept in float32" on every dtype cast, even for a model that has none."""
    return torch.nn.Module.to(model, *args)


@dataclass
class Encoded:
    """A diagonal Gaussian posterior q(z|x) for a batch of images.

    Attributes:
        mean: (B,C,h,w) unscaled latent mean.
        logvar: (B,C,h,w) log-variance, clamped to [-30, 20] as diffusers does.
        size: (H, W) of the images before padding, in pixels.
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    size: tuple[int, int]

    def latents(self, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """The posterior mean, or a reparameterized draw z = mean + exp(logvar/2)·ε.

        Args:
            sample: draw instead of returning the mean.
            generator: CPU generator that makes the draw reproducible.

        Returns:
            (B,C,h,w) unscaled latents.
        """
        if not sample:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32).to(self.mean)
        return self.mean + torch.exp(0.5 * self.logvar) * eps


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = True`` for the block, then the caller's setting again."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class Codec:
    """A VAE ready to encode/decode on one device, at one precision, with one tiling policy.

    The fp32 weights are kept as the master copy; a fp16/bf16 copy is made on demand, so falling
    back to fp32 loses nothing.

    Args:
        vae: the model (any dtype; it is kept/cast to fp32 as master).
        device: 'cpu' or 'cuda' (or any torch device string).
        dtype: 'auto' | 'fp32' | 'fp16' | 'bf16' for the computation ('auto': see
            :func:`sdvae.model.dtypes.resolve_dtype`; ``dtype_name`` says what was chosen).
        tile: 'auto' (tile above a size), 'on' or 'off'.
        memory_format: 'auto' | 'channels_last' | 'contiguous' layout of the computing weights and inputs
            ('auto': :func:`resolve_memory_format`; ``memory_format_name`` says what was chosen). Outputs
            are returned contiguous either way. Exact tiling stays exact in both layouts. An fp32 codec
            lays out the master (the model passed in) in place; a low-precision one only its copy.
        compile: ``torch.compile`` the encoder and decoder modules (``dynamic=False``: one graph per input
            shape, reused for every later batch of that shape; on CUDA also cuDNN autotuning). A string
            names the ``torch.compile`` backend (True: ``inductor``). Tiled runs and the fp32 fallback stay
            eager. The first call of each shape pays the compile: only long jobs of fixed shapes gain.
        fused: run the low-precision (fp16/bf16) model on :mod:`sdvae.codec.fused`'s eager path (in-place
            activations and residuals, sub-pixel upsampling convs; same weights, bf16-tolerance rounding).
            None (default): on for fp16/bf16 when not compiling. fp32 always runs diffusers' modules, bit
            for bit, and so does any structure the fused path does not know.

    Attributes:
        channels: the model's image channel count C (1 grayscale, 3 RGB, 4 RGBA): images are (B,C,H,W).
        compile_seconds: wall time of the first call of each compiled graph (compile plus one run),
            summed; each one is also described in :attr:`notes`.

    Raises:
        UserError: the model's image channels are not 1, 3 or 4 (or differ between encoder and decoder),
            in one line naming them (:func:`sdvae.images.channels.model_channels`).
    """

    def __init__(self, vae: AutoencoderKL, *, device: str | torch.device = "cpu", dtype: str = "fp32",
                 tile: str = "auto", memory_format: str = "auto", compile: bool | str = False,
                 fused: bool | None = None):
        if tile not in TILE_MODES:
            raise ValueError(f"tile must be one of {TILE_MODES}, got {tile!r}")
        self.device = torch.device(device)
        self.dtype_name = resolve_dtype(dtype, self.device)
        self.dtype = torch_dtype(self.dtype_name)
        self.memory_format_name = resolve_memory_format(memory_format, self.device, self.dtype_name)
        self.tile = tile
        self.channels = model_channels(vae.config)
        self.master = _cast(vae, self.device, torch.float32).eval()
        self.factor = downsample_factor(vae)
        self.notes: list[str] = []
        self.compile_backend = ("inductor" if compile is True else compile) or None
        self.compile_seconds = 0.0
        self._low: AutoencoderKL | None = None
        self._master_laid_out = False
        self._compiled: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._graphs: set[tuple] = set()
        self._fused_wanted = (self.compile_backend is None) if fused is None else fused
        self._fused: FusedPath | None = None

    @property
    def config(self) -> dict:
        """The model config (scaling factors etc.)."""
        return self.master.config

    @property
    def _layout(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format_name == "channels_last" else torch.contiguous_format

    def _model(self, dtype: torch.dtype) -> AutoencoderKL:
        """The computing model: the master for fp32, else a low-precision copy; in the chosen layout only
        when it is the model of :attr:`dtype` (the fp32 fallback of a low-precision codec stays as given)."""
        if dtype == torch.float32:
            if self.dtype == torch.float32 and self._layout == torch.channels_last and not self._master_laid_out:
                self.master.to(memory_format=torch.channels_last)  # in place: the layout, not the values
                self._master_laid_out = True
            return self.master
        if self._low is None:
            self._low = _cast(copy.deepcopy(self.master), dtype).to(memory_format=self._layout)
            if self._fused_wanted:
                self._fused = fused_path(self._low)
        return self._low

    def _layout_of(self, model: AutoencoderKL) -> torch.memory_format:
        """The layout ``model``'s inputs should have: the one its conv weights have."""
        return self._layout if model is self._model(self.dtype) else torch.contiguous_format

    def _part(self, model: AutoencoderKL, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``model.encoder`` / ``model.decoder`` of the computing model: the fused path's for fp16/bf16 (when
        on), else the module, through ``torch.compile`` when asked (timing the first call of each input shape);
        the fp32 fallback of a low-precision codec is always the plain module."""
        module = getattr(model, name)
        if model is not self._model(self.dtype):
            return module
        if self._fused is not None and model is self._low:
            return getattr(self._fused, name)
        if self.compile_backend is None:
            return module
        if name not in self._compiled:
            self._compiled[name] = torch.compile(module, backend=self.compile_backend, dynamic=False)
        compiled = self._compiled[name]

        def run(x: torch.Tensor) -> torch.Tensor:
            key = (name, tuple(x.shape), x.dtype, x.is_contiguous())
            if key in self._graphs:
                return compiled(x)
            start = time.perf_counter()
            with warnings.catch_warnings():  # diffusers' Upsample2D calls an lru_cache'd version check
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
                out = compiled(x)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            seconds = time.perf_counter() - start
            self._graphs.add(key)
            self.compile_seconds += seconds
            self.notes.append(f"torch.compile ({self.compile_backend}): {name} graph for {tuple(x.shape)} "
                              f"{self.dtype_name} in {seconds:.1f} s (first call: compile + one run)")
            return out

        return run

    def tiles(self, height: int, width: int) -> bool:
        """Whether an image of height × width pixels (a multiple of the factor) is encoded/decoded in tiles."""
        return self.tile == "on" or (self.tile == "auto" and should_tile(height, width))

    @torch.inference_mode()
    def _with_fallback(self, what: str, run) -> torch.Tensor:
        with self._autotune():
            out = run(self._model(self.dtype), self.dtype)
        if self.dtype != torch.float32 and not torch.isfinite(out).all():
            self.notes.append(f"{what} in {self.dtype_name} produced non-finite values; redone in fp32")
            out = run(self.master, torch.float32)
        return out.float().contiguous()

    def _autotune(self) -> contextlib.AbstractContextManager[None]:
        """cuDNN autotuning (``cudnn.benchmark``) while a compiled CUDA codec runs: fixed shapes repay the
        search; a one-off call of an eager codec would not. A no-op otherwise."""
        if self.compile_backend is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return _cudnn_benchmark()

    def encode(self, images: torch.Tensor) -> Encoded:
        """Encode images of any size.

        Args:
            images: (B,C,H,W) in [-1, 1] (C = :attr:`channels`), any H, W ≥ 1.

        Returns:
            The posterior over (B,C,ceil(H/f),ceil(W/f)) latents.
        """
        padded, size = pad_to_multiple(images, self.factor)
        tiled = self.tiles(*padded.shape[-2:])

        def run(model: AutoencoderKL, dtype: torch.dtype) -> torch.Tensor:
            x = padded.to(self.device, dtype)
            if tiled:
                with bounded_memory():  # tiling is for bounded memory (sdvae/heap.py)
                    return tiled_encode(model, x)
            h = self._part(model, "encoder")(x.contiguous(memory_format=self._layout_of(model)))
            return model.quant_conv(h) if model.quant_conv is not None else h

        moments = self._with_fallback("encode", run)
        mean, logvar = moments.chunk(2, dim=1)
        return Encoded(mean=mean, logvar=logvar.clamp(-30.0, 20.0), size=size)

    def decode(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Decode unscaled latents.

        Args:
            z: (B,C,h,w) unscaled latents (see :func:`sdvae.latents.scaling.unscale_latents`).
            size: (H, W) to crop the output to (the original image size); default: full size.

        Returns:
            (B,C,H,W) float32 on CPU, nominally in [-1, 1] (not clamped).
        """
        tiled = self.tiles(z.shape[-2] * self.factor, z.shape[-1] * self.factor)

        def run(model: AutoencoderKL, dtype: torch.dtype) -> torch.Tensor:
            latents = z.to(self.device, dtype)
            if tiled:
                with bounded_memory():
                    return tiled_decode(model, latents)
            # What AutoencoderKL(Flux2)._decode does untiled, with the decoder module callable compiled.
            latents = latents.contiguous(memory_format=self._layout_of(model))
            if model.post_quant_conv is not None:
                latents = model.post_quant_conv(latents)
            return self._part(model, "decoder")(latents)

        images = self._with_fallback("decode", run).cpu()
        return crop_to(images, size) if size is not None else images

    def roundtrip(self, images: torch.Tensor, sample: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, Encoded]:
        """Encode then decode.

        Args:
            images: (B,C,H,W) in [-1, 1].
            sample: decode a posterior draw instead of the mean.
            generator: makes the draw reproducible.

        Returns:
            (reconstruction (B,C,H,W) in about [-1, 1], the posterior).
        """
        enc = self.encode(images)
        return self.decode(enc.latents(sample, generator), enc.size), enc
