"""Peak memory: the process's resident-set high-water mark, or CUDA's max allocated."""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (VmHWM), in bytes."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: ru_maxrss is in bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak(device) -> None:
    """Start CUDA's high-water mark afresh (the RSS high-water mark cannot be reset: use a fresh process)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    """``torch.cuda.max_memory_allocated`` on CUDA, else this process's peak RSS."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def peak_kind(device) -> str:
    """What :func:`peak_bytes` measures on ``device``, for table captions."""
    return "CUDA max allocated" if str(device).startswith("cuda") else "peak RSS of the process"
