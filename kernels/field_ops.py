"""Op registration of the fused drifting field: the three passes of field_launch.py as torch.library custom ops
`drift::triton_field_scale_sums|sumsq|force`, with fake kernels, so torch.compile(fullgraph=True) traces a
function that calls them (also under the interpreter, where triton_op cannot be traced). Pass 3 mutates
pass 1's output buffer (it writes the force there).

`scale_sums`, `sumsq` and `force` are what drift/field/triton_driver.py calls: the custom ops while
torch.compile traces, the plain launchers otherwise (the same code without the dispatcher's ~20 us per op).
Design note: ../docs/field_kernels.md (relative to this folder).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .field_launch import field_force, field_scale_sums, field_sumsq


def _acc_dtype(gen: torch.Tensor) -> torch.dtype:
    return torch.float64 if gen.dtype == torch.float64 else torch.float32


@torch.library.custom_op("drift::triton_field_scale_sums", mutates_args=())
def triton_field_scale_sums(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                            neg_weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return field_scale_sums(gen, pos, neg, neg_weight)


@triton_field_scale_sums.register_fake
def _(gen, pos, neg, neg_weight):
    return gen.new_empty((2,), dtype=torch.float64), gen.new_empty(gen.shape, dtype=_acc_dtype(gen))


@torch.library.custom_op("drift::triton_field_sumsq", mutates_args=())
def triton_field_sumsq(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                       neg_weight: Optional[torch.Tensor], buf: torch.Tensor, sums: torch.Tensor,
                       temperatures: List[float], normalization: str) -> torch.Tensor:
    return field_sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization)


@triton_field_sumsq.register_fake
def _(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization):
    return gen.new_empty((len(temperatures) + 1,), dtype=torch.float64)


@torch.library.custom_op("drift::triton_field_force", mutates_args=("buf",))
def triton_field_force(gen: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor],
                       neg_weight: Optional[torch.Tensor], buf: torch.Tensor, sums: torch.Tensor,
                       stats: torch.Tensor, temperatures: List[float],
                       normalization: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return field_force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization)


@triton_field_force.register_fake
def _(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization):
    dt = _acc_dtype(gen)
    return gen.new_empty(gen.shape[:-2], dtype=dt), gen.new_empty((2 + len(temperatures),), dtype=dt)


def scale_sums(gen, pos, neg, neg_weight):
    """Pass 1: (sums [2] fp64, buf [*batch, G, S]); see field_launch.field_scale_sums."""
    if torch.compiler.is_compiling():
        return torch.ops.drift.triton_field_scale_sums(gen, pos, neg, neg_weight)
    return field_scale_sums(gen, pos, neg, neg_weight)


def sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization):
    """Pass 2: [nR + 1] fp64; see field_launch.field_sumsq."""
    if torch.compiler.is_compiling():
        return torch.ops.drift.triton_field_sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization)
    return field_sumsq(gen, pos, neg, neg_weight, buf, sums, temperatures, normalization)


def force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization):
    """Pass 3: writes the force into buf, returns (loss [*batch], [scale, scale_inputs, force_rms...])."""
    if torch.compiler.is_compiling():
        return torch.ops.drift.triton_field_force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures,
                                                  normalization)
    return field_force(gen, pos, neg, neg_weight, buf, sums, stats, temperatures, normalization)
