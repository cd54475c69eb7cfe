"""drift: Drifting Models (Deng et al., arXiv 2602.04770) in PyTorch.

Public API (stable names): drift.field.drifting_field, drift.loss.drifting_loss.
Heavy dependencies (DALI, wandb, triton) are imported lazily by the modules that need them.
"""
__version__ = "0.1.0"
