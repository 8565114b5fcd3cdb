"""Finding network weights that are never downloaded at run time (LPIPS backbones, FID's Inception).

They are read from an explicit file the user names, or from the torch hub cache where torchvision or
torch-fidelity would have downloaded them; otherwise one line says what to fetch and where to put it.
"""

from __future__ import annotations

from pathlib import Path

from sdvae.errors import MissingWeights, UserError


def hub_cache_path(filename: str) -> Path:
    """Where torch's hub keeps a downloaded file: ``torch.hub.get_dir()/checkpoints/FILENAME``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def find_local_weights(explicit: str | Path, filename: str, url: str, *, option: str, what: str) -> Path:
    """The weights file to read: ``explicit`` if given, else the torch hub cache's copy of ``filename``.

    Args:
        explicit: a path the user gave ("" for none).
        filename: the file's published name (e.g. ``vgg16-397923af.pth``).
        url: where it is published (named in the messages, never fetched).
        option: how the user passes ``explicit`` (e.g. ``--lpips-weights``).
        what: what the weights are, for the message (e.g. ``LPIPS-vgg backbone``).

    Raises:
        UserError: ``explicit`` does not exist (a typo must not silently drop a metric).
        MissingWeights: nothing explicit and the cache lacks the file.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"{option} {path}: no such file (expected {filename} from {url})")
        return path
    path = hub_cache_path(filename)
    if not path.is_file():
        raise MissingWeights(f"{what} weights {filename} are not in the torch hub cache ({path}) and are never "
                             f"downloaded at run time; download {url} there or pass {option}=/path/to/{filename}")
    return path
