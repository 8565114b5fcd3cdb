"""FLOPs of a call (``torch.utils.flop_counter``) and the device's peak, to report the share reached."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's datasheets: H100 SXM5 / H200 SXM ("H100
# Tensor Core GPU" and "H200" datasheets, 2023-24: bf16/fp16 1,979 *with sparsity* = 989 dense, fp32
# 67), H100 PCIe (756 dense, fp32 51), H100 NVL (835 dense, fp32 60), A100 SXM4/PCIe (A100 datasheet:
# bf16/fp16 312 dense, fp32 19.5), L40S (362 dense, fp32 91.6), L4 (121 dense, fp32 30.3).
# "fp32" is the non-TF32 CUDA-core figure: `bench.py gpu` turns TF32 off. Matched by substring of
# ``torch.cuda.get_device_name()``, first match wins (so the PCIe/NVL variants come before "H100").
KNOWN_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(precision: str) -> str:
    """bench's precision spellings (``no``, ``fp32``, ``bf16``, ``fp16``) as a :data:`DTYPES` key."""
    return "fp32" if precision in ("no", "fp32", "") else precision


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(output, FLOPs) of ``fn()``: every matmul and convolution dispatched, backward passes included."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def known_peak(device_name: str, precision: str) -> float | None:
    """Datasheet peak TFLOP/s of a device by name (``torch.cuda.get_device_name()``), or None."""
    for key, peaks in KNOWN_PEAKS:
        if key.lower() in device_name.lower():
            return peaks.get(precision_name(precision))
    return None


def _gemm_seconds(n: int, dtype: torch.dtype, repeats: int, device) -> float:
    """Best seconds of an n×n×n matmul (after one warm-up call)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_gemm_tflops(precision: str, sides: tuple[int, ...] = (256, 512, 1024, 2048), repeats: int = 3,
                        device="cpu") -> float:
    """The best TFLOP/s of square matmuls in ``precision`` on ``device`` (this process's threads), trying
    ``sides`` in turn until one call takes over 50 ms (slow, emulated dtypes stay quick to measure)."""
    dtype, best = DTYPES[precision_name(precision)], 0.0
    for n in sides:
        seconds = _gemm_seconds(n, dtype, repeats, device)
        best = max(best, 2 * n**3 / seconds / 1e12)
        if seconds > 0.05:
            break
    return best


_MEASURED: dict[tuple[str, str], float] = {}


def device_peak(device, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for ``precision`` on ``device``.

    ``override`` (``--peak-tflops``) wins; a CUDA device is looked up in :data:`KNOWN_PEAKS`; a CPU (or
    an unknown GPU) gets a GEMM of the same precision measured once in this process.
    """
    if override:
        return float(override), "--peak-tflops"
    name = precision_name(precision)
    if str(device).startswith("cuda"):
        gpu = torch.cuda.get_device_name(device)
        if (peak := known_peak(gpu, name)) is not None:
            return peak, f"{gpu} datasheet ({name}, dense)"
    key = (str(device), name)
    if key not in _MEASURED:
        _MEASURED[key] = measure_gemm_tflops(name, device=device)
    return _MEASURED[key], f"measured {name} GEMM on {device}"


def achieved(flops: float | None, seconds: float) -> float | None:
    """TFLOP/s of ``flops`` done in ``seconds`` (None when not counted)."""
    return flops / seconds / 1e12 if flops and seconds > 0 else None


def share(tflops: float | None, peak: float | None) -> float | None:
    """``tflops`` as a fraction of ``peak``."""
    return tflops / peak if tflops is not None and peak else None
