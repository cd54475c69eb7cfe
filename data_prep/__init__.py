"""Shard-packing CLI for drift: `drift-prep imagefolder|idx|verify` (see data_prep.cli)."""
