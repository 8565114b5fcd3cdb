"""Names of the supported weight/compute precisions, their torch dtypes, and the automatic choice.

``auto`` (the inference default) is a fixed rule, not a timing at start-up: bf16 where the hardware
computes it natively — a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 or AMX — else fp32.
fp16 is never chosen automatically (its range overflows in some VAEs; it is available on request,
with the codec's fp32 fallback on non-finite output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdvae.errors import UserError

if TYPE_CHECKING:  # torch loads lazily so importing this module stays cheap
    import torch


DTYPES = ("fp32", "fp16", "bf16")
DTYPE_CHOICES = ("auto", *DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """Map 'fp32' | 'fp16' | 'bf16' to a torch dtype."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(table)}")
    return table[name]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as torch detects them."""
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (the rule behind ``auto``)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        # Natively: torch's default also counts bf16 it only emulates (pre-Ampere GPUs such as T4, V100).
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_dtype(name: str, device: str | torch.device) -> str:
    """The precision ``name`` means on ``device``: ``auto`` → bf16 or fp32 by :func:`native_bf16`."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    torch_dtype(name)  # validates
    return name
