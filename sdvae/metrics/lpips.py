"""The frozen LPIPS network of the perceptual loss term, built without ever touching the network.

The ``lpips`` package ships the small calibrated linear layers; the ImageNet backbone (VGG16,
AlexNet or SqueezeNet 1.1, torchvision's own weights) is read from a given file or from the torch
hub cache, and its absence is a one-line :class:`UserError` saying which file to download and where
to put it (:func:`build_lpips`). The distance itself, and the rest of the loss math, is in
:mod:`sdvae.train.losses` (:func:`~sdvae.metrics.lpips.lpips_distance`). ``lpips`` is imported only when a
network is built, so importing this module (or :mod:`sdvae.train.losses`) stays cheap.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from sdvae.errors import UserError, first_line
from sdvae.local_weights import find_local_weights, hub_cache_path


def lpips_distance(model: nn.Module, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS distance, differentiable w.r.t. ``recon`` (``lpips.LPIPS.forward``, split by precision).

    The backbone (VGG/AlexNet/SqueezeNet features: nearly all of LPIPS' cost, more than the tiny
    VAE's own at 64²) runs under the caller's autocast, so bf16 training speeds it up too. The rest
    runs in fp32: ``lpips.normalize_tensor`` divides by ``sqrt(Σ f²) + 1e-10``, and in fp16 the sum of
    squares over up to 512 channels can overflow and the epsilon underflows to 0 (0/0 = NaN on dead
    ReLU pixels). Without autocast this equals ``model(images, recon)`` (LPIPS v0.1, not spatial).

    Args:
        model: from :func:`sdvae.metrics.lpips.build_lpips`.
        images, recon: (B, 3, H, W) in [-1, 1] (LPIPS' own convention, ``normalize=False``).

    Returns:
        (B,) fp32 distances.
    """
    import lpips

    feats0 = model.net(model.scaling_layer(images.float()))
    feats1 = model.net(model.scaling_layer(recon.float()))
    with torch.autocast(device_type=recon.device.type, enabled=False):
        total = torch.zeros((), device=recon.device)
        for k, (f0, f1) in enumerate(zip(feats0, feats1, strict=True)):
            diff = (lpips.normalize_tensor(f0.float()) - lpips.normalize_tensor(f1.float())) ** 2
            total = total + model.lins[k](diff).mean(dim=(2, 3), keepdim=True)  # lpips.spatial_average
        return total.flatten()

# LPIPS backbone -> (torchvision builder, torchvision weights enum): the ImageNet weights that
# lpips.LPIPS(pnet_rand=False) would fetch through torch hub.
_BACKBONES: dict[str, tuple[str, str]] = {
    "vgg": ("vgg16", "VGG16_Weights"),
    "alex": ("alexnet", "AlexNet_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}


def lpips_backbone_url(net: str) -> str:
    """torchvision's download URL of the ImageNet backbone of LPIPS-``net`` (from the installed torchvision)."""
    from torchvision import models

    if net not in _BACKBONES:
        raise UserError(f"loss.lpips_net: {net!r} is not one of {', '.join(_BACKBONES)}")
    return getattr(models, _BACKBONES[net][1]).IMAGENET1K_V1.url


def lpips_backbone_cache_path(net: str) -> Path:
    """Where torch hub keeps that file: ``torch.hub.get_dir()/checkpoints/<file name of the URL>``."""
    return hub_cache_path(os.path.basename(lpips_backbone_url(net)))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable/corrupt files raise many types; all mean "not usable"
        raise UserError(f"{path}: cannot read LPIPS backbone weights ({first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], path: Path, net: str) -> None:
    """Copy a torchvision ``features.N.*`` state dict (or a whole LPIPS state dict) into ``model``.

    lpips' backbone keeps torchvision's layer indices (``features.N.x`` becomes ``sliceK.N.x``), so
    the mapping needs no per-architecture table. A full LPIPS state dict (``net.sliceK.N.x`` plus
    ``lin*`` keys) is accepted too, and then its linear layers replace the packaged ones.
    """
    arch = _BACKBONES[net][0]
    selected: dict[str, torch.Tensor] = {}
    for key, target in model.net.state_dict().items():
        _slice, index, rest = key.split(".", 2)
        candidates = (f"features.{index}.{rest}", f"net.{key}")
        found = next((c for c in candidates if c in state), None)
        if found is None:
            raise UserError(f"{path}: not torchvision {arch} weights (no 'features.{index}.{rest}'); "
                            f"expected the file {os.path.basename(lpips_backbone_url(net))}")
        if state[found].shape != target.shape:
            raise UserError(f"{path}: not torchvision {arch} weights ('{found}' has shape "
                            f"{tuple(state[found].shape)}, expected {tuple(target.shape)})")
        selected[f"net.{key}"] = state[found]
    lin_keys = [k for k in model.state_dict() if k.startswith("lin")]
    present = [k for k in lin_keys if k in state]
    if present and len(present) != len(lin_keys):
        raise UserError(f"{path}: has only some of the LPIPS linear layers ({len(present)}/{len(lin_keys)} tensors)")
    selected.update({k: state[k] for k in present})
    model.load_state_dict(selected, strict=False)


def build_lpips(
    net: str = "vgg", weights_path: str | os.PathLike[str] = "", random_backbone: bool = False,
    option: str = "--loss.lpips_weights",
) -> nn.Module:
    """A frozen ``lpips.LPIPS`` module, built without ever touching the network.

    The small calibrated linear layers ship inside the ``lpips`` package. The ImageNet backbone is
    read from, in order: ``weights_path``; the torch hub cache (``torch.hub.get_dir()/checkpoints/``,
    where torchvision would have downloaded it); otherwise a one-line :class:`UserError` says which
    file to download and where to put it. The result has ``requires_grad=False`` everywhere and is in
    eval mode (no dropout), but it is an ordinary differentiable function of its inputs: call it with
    gradients enabled so the reconstruction receives the perceptual gradient.

    Args:
        net: ``"vgg"`` (LDM's choice), ``"alex"`` or ``"squeeze"``.
        weights_path: local torchvision backbone state dict (``.pth`` via ``torch.load(weights_only=True)``
            or ``.safetensors``); a full LPIPS state dict also works and then overrides the linear layers.
        random_backbone: skip the backbone weights and keep a randomly initialised one (tests only:
            the distance is then not perceptual).
        option: how the caller's user passes ``weights_path`` (named in errors).

    Raises:
        MissingWeights: no ``weights_path`` and the torch hub cache lacks the backbone.
        UserError: unknown ``net``, a missing ``weights_path``, unreadable weights.
    """
    url = lpips_backbone_url(net)  # validates net
    source = None if random_backbone else find_local_weights(
        weights_path, os.path.basename(url), url, option=option, what=f"LPIPS-{net} backbone")
    import lpips

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` interface
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand=True: build the backbone without weights (torchvision would download them);
        # pretrained=True: load the packaged linear layers (a local file, no network).
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, pnet_tune=False, verbose=False)
    if source is not None:
        _load_backbone(model, _read_state_dict(source), source, net)
    # Channels-last backbone: its convolutions then run channels-last whatever the input's layout
    # (VGG on an AVX512-BF16 CPU, batch 16 at 64², two branches + backward: bf16 0.51 → 0.42 s, fp32
    # 0.90 → 0.67 s; 4 images at 256², two branches: bf16 1.49 → 1.11 s, fp32 2.49 → 1.91 s).
    model.net.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)
