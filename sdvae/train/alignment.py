"""VA-VAE's vision-foundation alignment of the latents (``loss.alignment``): frozen backbone, projection, VF loss.

VA-VAE (Yao et al., CVPR 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent
Diffusion Models") regularises the latent space towards a frozen vision foundation model (DINOv2): a
trained 1×1 convolution ``P`` maps the sampled latent ``z`` (B, c, h, w; the z the decoder sees) to the
backbone's feature width D, and the "VF loss" compares ``P(z)`` with the backbone's patch features ``f``
(B, D, h, w) of the image::

    L_mcos = mean_{b,i}   ReLU(1 − m1 − cos(P(z)_bi, f_bi))                       (marginal cosine)
    L_mdms = mean_{b,i,j} ReLU(|cos(P(z)_bi, P(z)_bj) − cos(f_bi, f_bj)| − m2)     (marginal distance matrix)
    VF     = L_mcos + L_mdms

with i, j positions of one image's h×w grid and VA-VAE's margins m1 = 0.5, m2 = 0.25 (a position or pair stops
counting once it is within the margin of its target, so ``P(z)`` need not reproduce ``f`` exactly). The total
adds ``loss.alignment · VF`` (:class:`VFAlignment`, in :class:`sdvae.train.losses.VAELoss`); VA-VAE scales VF by an
adaptive weight (the ratio of the reconstruction and VF gradient norms at the encoder's last layer,
``loss.alignment_adaptive``). The plain weight is the default because it is one number whose meaning does
not drift during training and costs no extra backward passes; the adaptive one is kept for VA-VAE's recipe.

Grid: the image is resized so that the backbone's patch grid *is* the latent grid (h·p × w·p pixels for
patch side p), as VA-VAE does (256² images → 224² for DINOv2's 16×16 grid against its f16 latents). Each
latent cell then has exactly one backbone token covering the same image region; interpolating features
computed on another grid would instead hand neighbouring cells blends or copies of the same tokens,
which the distance-matrix term would then ask the latents to reproduce. The price: an f8 VAE at 256²
shows the backbone 448² images (1024 tokens), about 4× the cost of 224².

The backbone is a ``timm`` ViT (``pip install 'sdvae[align]'``) read from a local ``model.safetensors``
only, never downloaded (:func:`load_backbone`). Nothing here is part of the exported VAE: the projection
is trained with the VAE and checkpointed with the loss (:meth:`sdvae.train.losses.VAELoss.state_module`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sdvae.errors import MAX_REASON, UserError, require_extra
from sdvae.images.channels import rgb_view
from sdvae.train.adaptive import adaptive_weight
from sdvae.train.modules import unwrap

if TYPE_CHECKING:
    from sdvae.train.config import LossConfig

DEFAULT_MODEL = "vit_large_patch14_dinov2"  # DINOv2 ViT-L/14, VA-VAE's backbone
WEIGHTS_FILE = "model.safetensors"  # the file name timm's Hugging Face repositories publish
COS_MARGIN = 0.5  # VA-VAE's m1
DISTMAT_MARGIN = 0.25  # VA-VAE's m2
VF_ADAPTIVE_MAX = 1e8  # VA-VAE's clamp on its adaptive VF weight


# --------------------------------------------------------------------------------------------------
# The VF loss
# --------------------------------------------------------------------------------------------------


def marginal_cosine_loss(projected: torch.Tensor, features: torch.Tensor, margin: float = COS_MARGIN) -> torch.Tensor:
    """``mean ReLU(1 − margin − cos(projected_bi, features_bi))`` over images b and positions i, in fp32.

    Args:
        projected: (B, D, h, w) projected latents ``P(z)``.
        features: (B, D, h, w) backbone features of the same images.
        margin: m1 ∈ [0, 2]; a position whose cosine similarity is ≥ 1 − m1 adds nothing.

    Returns:
        0-dim fp32 tensor in [0, 2 − margin].
    """
    cos = F.cosine_similarity(projected.float(), features.float(), dim=1)  # (B, h, w)
    return F.relu(1.0 - margin - cos).mean()


def _self_cosines(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) → (B, N, N) cosine similarities between the N = h·w positions of each image."""
    unit = F.normalize(x.float().flatten(2), dim=1)  # (B, D, N)
    return unit.transpose(1, 2) @ unit


def marginal_distance_matrix_loss(
    projected: torch.Tensor, features: torch.Tensor, margin: float = DISTMAT_MARGIN
) -> torch.Tensor:
    """``mean ReLU(|cos(p_bi, p_bj) − cos(f_bi, f_bj)| − margin)`` over images b and position pairs (i, j), fp32.

    Compares the two self-similarity structures within each image (never across images), so it is
    invariant to any rotation of the feature space; the (B, N, N) matrices cost O(B·N²) memory
    (N = h·w: 1024 for 32×32 latents, 4 MiB per image).

    Args:
        projected: (B, D, h, w) projected latents.
        features: (B, D, h, w) backbone features.
        margin: m2 ∈ [0, 2]; a pair whose similarities differ by ≤ m2 adds nothing.

    Returns:
        0-dim fp32 tensor in [0, 2 − margin].
    """
    return F.relu((_self_cosines(projected) - _self_cosines(features)).abs() - margin).mean()


def vf_loss(
    projected: torch.Tensor, features: torch.Tensor, cos_margin: float = COS_MARGIN,
    distmat_margin: float = DISTMAT_MARGIN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VA-VAE's VF loss ``L_mcos + L_mdms`` (module docstring) and its two parts, in fp32 whatever the autocast.

    Args:
        projected: (B, D, h, w) projected latents ``P(z)``, attached to the encoder's graph.
        features: (B, D, h, w) backbone features (no grad needed).
        cos_margin, distmat_margin: m1 and m2.

    Returns:
        (total, L_mcos, L_mdms), 0-dim fp32 tensors.
    """
    if projected.shape != features.shape:
        raise ValueError(f"vf_loss: projected latents {tuple(projected.shape)} and features "
                         f"{tuple(features.shape)} differ in shape")
    with torch.autocast(projected.device.type, enabled=False):  # fp32 cosines even inside a bf16/fp16 step
        mcos = marginal_cosine_loss(projected, features, cos_margin)
        mdms = marginal_distance_matrix_loss(projected, features, distmat_margin)
    return mcos + mdms, mcos, mdms


# --------------------------------------------------------------------------------------------------
# The trained projection and the frozen backbone
# --------------------------------------------------------------------------------------------------


class AlignmentProjection(nn.Module):
    """VA-VAE's ``P``: a 1×1 convolution without bias from the c latent channels to the D feature channels.

    Trained with the VAE (its parameters join the VAE's optimizer), kept in training checkpoints, never
    exported with the VAE. ``forward``: (B, c, h, w) → (B, D, h, w), run in fp32 (the caller's autocast
    is switched off: the cosine similarities of the VF loss want full precision, and the layer is tiny).
    """

    def __init__(self, latent_channels: int, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            return self.proj(latents.float())


class FrozenBackbone(nn.Module):
    """A frozen timm ViT giving patch features on a requested grid; always in eval mode, never trained.

    ``forward(images, grid)``: images (B, C, H, W) in [-1, 1] (C = 1, 3 or 4; the RGB view is used) →
    [0, 1] → resized (bilinear, antialiased) to ``grid[0]·p × grid[1]·p`` pixels → the backbone's own
    normalisation (ImageNet mean/std for DINOv2) → the final normed patch tokens (class and register
    tokens dropped) as (B, D, grid[0], grid[1]) fp32, computed without gradient. The ViT itself runs
    under the caller's autocast (its cost dominates), the resize and the output are fp32.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        patch = vit.patch_embed.patch_size
        self.patch = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch),) * 2
        self.feature_dim = int(vit.embed_dim)
        self.prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stays in eval mode (no dropout / drop-path): a fixed target."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        with torch.autocast(images.device.type, enabled=False):
            x = (rgb_view(images.float()) + 1) / 2
            x = F.interpolate(x, size=(h * self.patch[0], w * self.patch[1]), mode="bilinear", align_corners=False,
                              antialias=True)
            x = (x - self.mean) / self.std
        tokens = self.vit.forward_features(x)[:, self.prefix_tokens:]  # (B, h·w, D), row-major patches
        if tokens.shape[1] != h * w:
            raise ValueError(f"backbone returned {tokens.shape[1]} patch tokens for a {h}x{w} grid")
        return tokens.float().transpose(1, 2).reshape(len(images), self.feature_dim, h, w)


def backbone_file(path: str | Path, model_name: str = DEFAULT_MODEL) -> Path:
    """The weights file behind ``loss.alignment_backbone``: the file itself, or ``model.safetensors`` in a folder.

    Raises:
        UserError: nothing there (the message names the path and the command that fetches the file).
    """
    given = Path(path).expanduser()
    found = given / WEIGHTS_FILE if given.is_dir() else given
    if found.is_file():
        return found
    hub_id = _hub_id(model_name)
    fetch = (f"`hf download {hub_id} {WEIGHTS_FILE} --local-dir DIR`" if hub_id
             else f"{model_name}'s weights as DIR/{WEIGHTS_FILE}")
    raise UserError(f"loss.alignment_backbone {found}: no such file (the backbone is never downloaded at run "
                    f"time); fetch it with {fetch} and set loss.alignment_backbone=DIR")


def _hub_id(model_name: str) -> str:
    """timm's Hugging Face repository of ``model_name``'s default weights ("" if unknown or timm is missing)."""
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return "timm/vit_large_patch14_dinov2.lvd142m" if model_name == DEFAULT_MODEL else ""
    cfg = get_pretrained_cfg(model_name)
    return (getattr(cfg, "hf_hub_id", None) or "") if cfg is not None else ""


def load_backbone(path: str | Path, model_name: str = DEFAULT_MODEL, **model_kwargs: object) -> FrozenBackbone:
    """Build the frozen backbone ``model_name`` from a local safetensors file, without touching the network.

    ``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": ...},
    dynamic_img_size=True, num_classes=0)``: timm's own loading (its checkpoint filter, strict key check)
    from that file only; ``dynamic_img_size`` lets the ViT take any multiple of its patch (position
    embeddings interpolated).

    Args:
        path: ``loss.alignment_backbone``, a ``.safetensors`` file or a folder holding ``model.safetensors``.
        model_name: a timm ViT name (``loss.alignment_model``), e.g. ``vit_large_patch14_dinov2``.
        model_kwargs: passed to the model's constructor (tests: tiny widths).

    Raises:
        UserError: timm missing (names the extra), unknown model, missing or unreadable file, or weights
            of another architecture — one line each.
    """
    require_extra("timm", "loss.alignment", extra="align")
    import timm

    if not timm.is_model(model_name):
        raise UserError(f"loss.alignment_model: {model_name!r} is not a timm model name (e.g. {DEFAULT_MODEL})")
    file = backbone_file(path, model_name)
    if file.suffix != ".safetensors":
        raise UserError(f"loss.alignment_backbone {file}: expected a .safetensors file (no pickled checkpoints)")
    try:
        vit = timm.create_model(model_name, pretrained=True, num_classes=0, dynamic_img_size=True,
                                pretrained_cfg_overlay={"file": str(file), "source": "timm"}, **model_kwargs)
    except Exception as err:  # unreadable file, wrong architecture (missing/unexpected keys, shapes)...
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:MAX_REASON]
        raise UserError(f"loss.alignment_backbone {file}: cannot load it as {model_name} "
                        f"({type(err).__name__}: {detail})") from None
    if not hasattr(vit, "forward_features") or not hasattr(vit, "patch_embed"):
        raise UserError(f"loss.alignment_model: {model_name!r} is not a ViT with patch tokens")
    return FrozenBackbone(vit)


def encoder_last_layer(vae: nn.Module) -> nn.Parameter:
    """The weight VA-VAE balances the VF loss against: ``encoder.conv_out.weight`` of the (unwrapped) VAE.

    Accepts the AutoencoderKL or a wrapper holding it as ``.vae``/``.module`` (like
    :func:`sdvae.train.modules.decoder_last_layer`); returns the very parameter tensor.
    """
    model = unwrap(vae)
    if not hasattr(model, "encoder") and isinstance(getattr(model, "vae", None), nn.Module):
        model = unwrap(model.vae)
    return model.encoder.conv_out.weight


class VFAlignment(nn.Module):
    """The whole ``loss.alignment`` term: frozen backbone, trained projection, margins and weight w_al.

    ``forward(images, latents, nll, encoder_last_layer)`` → ``(w_al · VF, logs)``. Inputs: images (B, C, H, W)
    in [-1, 1]; the sampled latents (B, c, h, w), attached to the encoder's graph; the 0-dim reconstruction
    term ``nll`` and the encoder's last weight (:func:`encoder_last_layer`), both used only by the adaptive
    weight. ``logs``: ``alignment`` (VF), ``alignment_cos``, ``alignment_distmat`` (its parts), and with
    ``adaptive`` ``alignment_weight`` = ``weight · clamp(‖∇ nll‖ / (‖∇ VF‖ + 1e-4), 0, 1e8)`` (VA-VAE's,
    :func:`sdvae.train.adaptive.adaptive_weight`); without it w_al = ``weight``. 0-dim fp32 tensors.
    """

    def __init__(self, backbone: FrozenBackbone, latent_channels: int, weight: float, cos_margin: float = COS_MARGIN,
                 distmat_margin: float = DISTMAT_MARGIN, adaptive: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = AlignmentProjection(latent_channels, backbone.feature_dim)
        self.weight, self.cos_margin, self.distmat_margin, self.adaptive = weight, cos_margin, distmat_margin, adaptive

    @classmethod
    def from_config(cls, cfg: LossConfig, latent_channels: int, backbone: FrozenBackbone | None = None) -> VFAlignment:
        """The term ``cfg`` (the loss section) asks for; ``backbone``: use this one instead of loading it (tests)."""
        if backbone is None:
            backbone = load_backbone(cfg.alignment_backbone, cfg.alignment_model)
        return cls(backbone, latent_channels, cfg.alignment, cfg.alignment_cos_margin, cfg.alignment_distmat_margin,
                   cfg.alignment_adaptive)

    def forward(self, images: torch.Tensor, latents: torch.Tensor | None, nll: torch.Tensor,
                encoder_last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if latents is None:
            raise ValueError("loss.alignment > 0 needs the sampled latents (generator_loss(latents=...))")
        features = self.backbone(images, tuple(latents.shape[-2:]))
        term, mcos, mdms = vf_loss(self.projection(latents), features, self.cos_margin, self.distmat_margin)
        logs = {"alignment": term, "alignment_cos": mcos, "alignment_distmat": mdms}
        if not self.adaptive:
            return self.weight * term, logs
        if encoder_last_layer is None:
            raise ValueError("loss.alignment_adaptive needs generator_loss(encoder_last_layer=...)")
        weight = adaptive_weight(nll, term, encoder_last_layer, VF_ADAPTIVE_MAX) * self.weight
        logs["alignment_weight"] = weight
        return weight * term, logs
