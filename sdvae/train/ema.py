"""Exponential moving average of model weights (used for validation and the exported model)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay·shadow + (1-decay)·param`` for every floating-point tensor of a model.

    The shadow copy is fp32 on the model's device whatever precision the forward pass runs in. The
    effective decay warms up as ``min(decay, (1+n)/(10+n))`` after ``n`` updates so early averages are
    not dominated by the random initialisation.

    Args:
        model: the (unwrapped) model to track.
        decay: target decay, e.g. 0.999.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        current = [state[k].detach().float() for k in self.shadow]
        # One fused multi-tensor kernel instead of a Python loop over ~100 tensors (every step).
        torch._foreach_lerp_(list(self.shadow.values()), current, 1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a copy used for validation/export)."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the update count is stored as a 0-d tensor."""
        return {**{f"shadow.{k}": v for k, v in self.shadow.items()}, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` output."""
        self.updates = int(state["updates"])
        for k in self.shadow:
            self.shadow[k].copy_(state[f"shadow.{k}"])
