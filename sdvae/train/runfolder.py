"""One run folder, one trajectory: what a rerun of ``tools/train.py`` into an existing folder may do.

``train.resume``:

* ``auto`` (default): continue the newest checkpoint of ``train.out``. Refused (one line naming the
  keys) when the folder's ``config.yaml`` differs from this run in a key that changes the training
  trajectory (e.g. ``train.steps`` changes the cosine schedule); keys that do not (:data:`FREE_KEYS`:
  where and how often to log, validate and checkpoint, worker count, tracker) may change freely.
* ``never``: a fresh run in that folder; its old ``checkpoints/`` are moved aside (``checkpoints-replaced-N``).
* a path (a checkpoint folder or a run folder): resume from that checkpoint whatever its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sdvae.errors import UserError
from sdvae.train.checkpoint import latest_checkpoint

# Keys that never change what is computed (only where/how often it is logged, saved or looked at).
FREE_KEYS = frozenset({
    "train.out", "train.resume", "train.checkpoint_every", "train.keep_checkpoints", "train.val_every",
    "train.max_bad_steps", "data.num_workers", "log.every", "log.with", "log.project",
})


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key`` names whose values differ between two config dicts, except :data:`FREE_KEYS`.

    Keys missing from one side (a run saved before the key existed) are not counted as changes.
    """
    changed = []
    for section, values in new.items():
        saved = old.get(section)
        if not isinstance(values, dict) or not isinstance(saved, dict):
            continue
        changed += [f"{section}.{k}" for k, v in values.items()
                    if k in saved and saved[k] != v and f"{section}.{k}" not in FREE_KEYS]
    return sorted(changed)


def resume_point(out: str | Path, config: dict[str, Any], resume: str) -> tuple[Path | None, bool]:
    """Where to resume from, and whether old checkpoints must be moved aside first (read-only).

    Args:
        out: the run folder.
        config: this run's resolved config as a dict (``config_to_dict``).
        resume: ``train.resume``.

    Returns:
        (checkpoint folder or None, move_aside).

    Raises:
        UserError: ``auto`` into a folder whose run differs in a trajectory-changing key, or a path
            without a checkpoint.
    """
    out = Path(out)
    if resume == "never":
        return None, latest_checkpoint(out) is not None
    if resume != "auto":
        path = Path(resume)
        found = path if (path / "state.json").is_file() else latest_checkpoint(path)
        if found is None:
            raise UserError(f"train.resume={resume}: no checkpoint there (a checkpoints/step-N folder or a run folder)")
        return found, False
    latest = latest_checkpoint(out)
    saved = out / "config.yaml"
    if latest is not None and saved.is_file():
        diff = changed_keys(yaml.safe_load(saved.read_text()) or {}, config)
        if diff:
            raise UserError(f"{out} holds a run with different {', '.join(diff)}; pass --train.resume=never for a "
                            "fresh run there (old checkpoints are moved aside), --train.resume=PATH, or another "
                            "--train.out")
    return latest, False


def move_checkpoints_aside(out: str | Path) -> Path:
    """Rename ``out/checkpoints`` to the first free ``out/checkpoints-replaced-N``; returns the new name."""
    src = Path(out) / "checkpoints"
    n = 1
    while (dst := src.with_name(f"checkpoints-replaced-{n}")).exists():
        n += 1
    src.rename(dst)
    return dst
