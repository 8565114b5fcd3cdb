"""The networks behind LPIPS and rFID, loaded from local files only (never downloaded at run time)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from sdvae.errors import MissingWeights, UserError, first_line
from sdvae.local_weights import find_local_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception (TF 2015 port)


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_lpips_metric(net: str, weights: str = "") -> tuple[nn.Module | None, str]:
    """The LPIPS network for evaluation, or why it is unavailable.

    Args:
        net: ``vgg`` | ``alex`` | ``squeeze``.
        weights: an explicit backbone file; "" uses the torch hub cache.

    Returns:
        (model, source description) or (None, one-line reason). Weights missing from the cache are
        "unavailable" (the rest of the evaluation still runs).

    Raises:
        UserError: an explicit ``weights`` file is missing or unusable (a typo should not silently
            drop a column from a long run), or ``net`` is unknown.
    """
    from sdvae.metrics.lpips import build_lpips, lpips_backbone_cache_path

    try:
        model = build_lpips(net, weights, option="--lpips-weights")
    except MissingWeights as err:
        return None, str(err)
    path = Path(weights).expanduser() if weights else lpips_backbone_cache_path(net)
    return model, f"LPIPS {net} (lpips package linear layers), backbone {path} sha256:{_sha256_prefix(path)}"


def load_fid_metric(weights: str = "") -> tuple[nn.Module | None, str]:
    """torchmetrics' FrechetInceptionDistance (2048-d pool features), or why it is unavailable.

    Args:
        weights: an explicit torch-fidelity Inception state dict; "" uses the torch hub cache
            (``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``).

    Returns:
        (metric, source description) or (None, one-line reason).

    Raises:
        UserError: an explicit ``weights`` file is missing or not a state dict of that network.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        return None, f"torch-fidelity/torchmetrics not importable ({err}); pip install 'torch-fidelity>=0.3'"
    try:
        path = find_local_weights(weights, INCEPTION_FILE, URL_INCEPTION_V3, option="--inception-weights",
                                  what="FID Inception")
    except MissingWeights as err:
        return None, str(err)
    try:
        # Checked with weights_only=True first: torch-fidelity itself unpickles with weights_only=False.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a state dict")
        metric = FrechetInceptionDistance(feature=2048, normalize=False, feature_extractor_weights_path=str(path))
    except Exception as err:  # corrupt file, other architecture: many exception types, one meaning
        raise UserError(f"--inception-weights {path}: not torch-fidelity's Inception state dict "
                        f"({first_line(err)})") from None
    return metric, f"torch-fidelity InceptionV3 pool3 (2048-d), {path} sha256:{_sha256_prefix(path)}"
