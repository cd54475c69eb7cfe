"""Stable import path of the drifting loss: `from drift.loss import drifting_loss`.

Kept as a thin re-export because it is part of the project's stable API (callers and documentation use
it); the implementation lives in drift/field/loss.py.
"""
from drift.field.loss import drifting_loss

__all__ = ["drifting_loss"]
