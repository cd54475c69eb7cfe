"""The coarse memory estimate: exact parameter count, terms that scale the way they should, and the refusal.

    pytest -q tests/test_memory.py
"""
import pytest
import torch

from drift.cli import UserError
from drift.config import TrainConfig
from drift.memory import GIB, check_fits, estimate_train_memory
from drift.model import build_generator_model

LATENT = (4, 32, 32)


def test_parameter_count_is_exact():
    cfg = TrainConfig.from_preset("tiny")
    est = estimate_train_memory(cfg, 4, (1, 8, 8), device_type="cpu")
    real = build_generator_model(cfg, 4, 8, 1)
    assert est.params == sum(p.numel() for p in real.parameters())
    assert est.terms["generator+optimizer+EMA"] == est.params * (16 + 4 * len(cfg.ema_decay))


def test_terms_scale_with_the_configuration():
    cfg = TrainConfig()
    base = estimate_train_memory(cfg, 1000, LATENT, device_type="cpu")
    two = estimate_train_memory(cfg, 1000, LATENT, world_size=2, device_type="cpu")
    assert two.gen_samples * 2 == base.gen_samples == cfg.train_batch_size * cfg.gen_per_label
    assert two.terms["generator activations"] * 2 == pytest.approx(base.terms["generator activations"])
    ckpt = estimate_train_memory(cfg.replace(grad_checkpointing=True), 1000, LATENT, device_type="cpu")
    assert ckpt.terms["generator activations"] < base.terms["generator activations"] / 4
    bf16 = estimate_train_memory(cfg, 1000, LATENT, device_type="cuda")
    assert bf16.terms["generator activations"] * 2 == pytest.approx(base.terms["generator activations"])
    mae = estimate_train_memory(cfg.replace(features="mae-latent"), 1000, LATENT, device_type="cpu")
    assert mae.terms["encoder activations"] > 10 * base.terms["encoder activations"]


def test_defaults_refused_on_a_small_machine_demo_fits():
    cpu = torch.device("cpu")
    est = estimate_train_memory(TrainConfig(), 1000, LATENT, device_type="cpu")
    with pytest.raises(UserError, match=r"estimated memory \d+\.\d GiB per rank .* exceeds the given \(24\.0 GiB\)"):
        check_fits(est, cpu, available=24 * GIB)
    demo = estimate_train_memory(TrainConfig.from_preset("demo"), 10, (1, 28, 28), device_type="cpu")
    assert demo.total < 1 * GIB and "estimated memory" in check_fits(demo, cpu, available=24 * GIB)
    two = estimate_train_memory(TrainConfig.from_preset("demo"), 10, (1, 28, 28), device_type="cpu",
                                ranks_per_host=2)
    with pytest.raises(UserError, match="x 2 ranks on this host"):  # ranks of one host share its RAM
        check_fits(two, cpu, available=demo.total * 1.5)
