"""Feature encoders (paper §4, §8; SPEC §4) and the registry `drift.features.build_feature_extractor` uses.

Filled in step by step; `EXTRACTOR_NAMES` lists what `build_extractor` accepts.
"""
from __future__ import annotations

EXTRACTOR_NAMES: tuple = ()


def build_extractor(name: str, **kw):
    raise ValueError(f"unknown feature extractor {name!r}; known: {('pixels',) + EXTRACTOR_NAMES}")
