"""Names of the supported weight/compute precisions and their torch dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdvae.errors import UserError

if TYPE_CHECKING:  # torch/diffusers load lazily so `import sdvae.model.load` stays cheap
    import torch
DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str) -> torch.dtype:
    """Map 'fp32' | 'fp16' | 'bf16' to a torch dtype."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(table)}")
    return table[name]
