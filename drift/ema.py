"""Exponential moving averages of the generator's weights (one copy per decay, official ema_decay).

ema = decay * ema + (1 - decay) * param for floating parameters (torch._foreach_lerp_), buffers copied.
The copies start equal to the model (DiT's update with decay 0), live on the model's device, and never
require gradients.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch
from torch import nn


class EMA:
    """EMA copies of `model` for each decay in `decays`; `models[decay]` is an nn.Module in eval mode."""

    def __init__(self, model: nn.Module, decays: Sequence[float]):
        if not decays:
            raise ValueError("decays must name at least one EMA decay")
        for d in decays:
            if not (0.0 <= float(d) < 1.0):
                raise ValueError(f"EMA decay must be in [0, 1), got {d}")
        self.decays = tuple(float(d) for d in decays)
        self.models: Dict[float, nn.Module] = {}
        for d in self.decays:
            m = copy.deepcopy(model).eval()
            m.requires_grad_(False)
            self.models[d] = m

    @staticmethod
    def key(decay: float) -> str:
        return f"{decay:g}"

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = [p.detach() for p in model.parameters()]
        for d, m in self.models.items():
            dst = list(m.parameters())
            floats = [(a, b) for a, b in zip(dst, src) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - d)
            for a, b in zip(m.buffers(), model.buffers()):
                a.copy_(b)

    def state_dict(self) -> Dict[str, dict]:
        return {self.key(d): m.state_dict() for d, m in self.models.items()}

    def load_state_dict(self, sd: Dict[str, dict]) -> None:
        want = {self.key(d) for d in self.decays}
        if set(sd) != want:
            raise ValueError(f"EMA state holds decays {sorted(sd)}, expected {sorted(want)}")
        for d, m in self.models.items():
            m.load_state_dict(sd[self.key(d)], strict=True)
