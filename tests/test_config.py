"""TrainConfig presets, the generated CLI, JSON round trips, and the alpha samplers.

    pytest -q tests/test_config.py
"""
import json
import math

import pytest
import torch

from drift.alpha import power_law_icdf, sample_alpha
from drift.config import PRESETS, TrainConfig, build_parser, parse_cli


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip_json(name, tmp_path):
    cfg = TrainConfig.from_preset(name)
    path = str(tmp_path / "c.json")
    cfg.save_json(path)
    assert TrainConfig.load_json(path) == cfg
    assert json.loads(open(path).read())["R_list"] == [0.02, 0.05, 0.2]


def test_preset_numbers_follow_the_paper():
    a = TrainConfig.from_preset("ablation-B/2")
    assert (a.train_batch_size, a.pos_per_sample, a.gen_per_label, a.neg_per_sample) == (64, 64, 64, 16)
    assert (a.lr, a.warmup_steps, a.max_steps, a.neg_cfg_pw, a.ema_decay) == (2e-4, 5000, 30000, 3.0, (0.999,))
    b = TrainConfig.from_preset("B/2")
    assert (b.train_batch_size, b.pos_per_sample, b.neg_per_sample, b.lr, b.weight_decay) == (128, 64, 32, 4e-4, 0.0)
    assert b.ema_decay == (0.999, 0.9995, 0.9998, 0.9999) and b.neg_cfg_pw == 5.0
    l2 = TrainConfig.from_preset("L/2")
    assert (l2.alpha_dist, l2.no_cfg_frac, l2.neg_cfg_pw, l2.model) == ("mixed", 0.5, 3.0, "DriftDiT-L/2")
    for n in ("B/16", "L/16"):
        c = TrainConfig.from_preset(n)
        assert (c.pos_per_sample, c.augment, c.max_steps, c.features) == (128, "train", 100000, "mae-pixel+convnext")
    assert TrainConfig.from_preset("L/16").lr == 4e-4 and TrainConfig.from_preset("B/16").lr == 2e-4
    # Official uncond weight (the function the trainer calls): ablation N_neg 64, N_unc 16 -> 3.9375 (alpha - 1).
    from drift.alpha import cfg_weight
    assert cfg_weight(2.0, a.gen_per_label, a.neg_per_sample) == pytest.approx(3.9375)
    assert cfg_weight(1.0, a.gen_per_label, a.neg_per_sample) == 0.0
    assert cfg_weight(3.0, b.gen_per_label, b.neg_per_sample) == pytest.approx(2 * 1.96875)
    w = cfg_weight(torch.tensor([1.0, 2.0, 4.0]), 64, 16)
    assert torch.allclose(w, torch.tensor([0.0, 3.9375, 3 * 3.9375]))
    assert float(cfg_weight(torch.tensor([3.0]), 64, 0).abs().sum()) == 0.0


def test_cli_preset_first_then_flags_and_round_trip():
    cfg, ns = parse_cli(["--preset", "B/2", "--lr", "1e-3", "--R-list", "0.05", "0.2", "--no-compile",
                         "--ema-decay", "0.9", "0.99", "--resume", "auto"])
    assert cfg.lr == 1e-3 and cfg.R_list == (0.05, 0.2) and cfg.compile is False
    assert cfg.ema_decay == (0.9, 0.99) and ns.resume == "auto"
    assert cfg.train_batch_size == 128 and cfg.weight_decay == 0.0  # untouched preset values survive
    # Every field has a flag, and feeding a config's values back as flags reproduces it.
    flags = []
    for k, v in cfg.to_dict().items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            flags += [flag] + [str(x) for x in v]
        else:
            flags += [flag, str(v)]
    again, _ = parse_cli(flags)
    assert again == cfg
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert "N_c" in helps["train_batch_size"] and helps["lr"]


def test_config_file_between_preset_and_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 5e-4, "gen_per_label": 8}))
    cfg, _ = parse_cli(["--preset", "demo", "--config", str(path), "--gen-per-label", "12"])
    assert cfg.lr == 5e-4 and cfg.gen_per_label == 12 and cfg.model == PRESETS["demo"]["model"]


@pytest.mark.parametrize("kw, word", [
    (dict(gen_per_label=1), "gen_per_label"), (dict(train_batch_size=0), "train_batch_size"),
    (dict(alpha_dist="gauss"), "alpha_dist"), (dict(cfg_min=0.5), "cfg_min"), (dict(R_list=()), "R_list"),
    (dict(ema_decay=(1.0,)), "ema_decay"), (dict(no_cfg_frac=1.5), "no_cfg_frac"), (dict(wandb="yes"), "wandb"),
    (dict(num_style_tokens=-2), "num_style_tokens"), (dict(num_prefix_tokens=-3), "num_prefix_tokens"),
])
def test_bad_values_name_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig.from_preset("demo", **kw)


def test_unknown_and_mistyped_keys_raise():
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig.from_dict({"max_steps": "ten"})
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("XL/2")
    with pytest.raises(SystemExit):
        parse_cli(["--preset", "nope"])


# ---------------------------------------------------------------------------------------------------
# alpha samplers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1.0, 3.0, 5.0])
def test_power_law_quantiles_match_inverse_cdf(k):
    g = torch.Generator().manual_seed(0)
    a = sample_alpha(200_000, dist="power", cfg_min=1.0, cfg_max=4.0, neg_cfg_pw=k, generator=g).double()
    assert a.min() >= 1.0 and a.max() <= 4.0
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    expect = power_law_icdf(qs, 1.0, 4.0, k)
    got = torch.quantile(a, qs)
    assert torch.allclose(got, expect, rtol=0, atol=0.01), (got, expect)
    # The CDF of p ~ alpha^-k evaluated independently (closed form) at the empirical median gives 1/2.
    med = float(got[2])
    if k == 1.0:
        cdf = math.log(med) / math.log(4.0)
    else:
        cdf = (1 - med ** (1 - k)) / (1 - 4.0 ** (1 - k))
    assert abs(cdf - 0.5) < 0.01


def test_documented_medians():
    # Paper notes §9: medians about 1.37 (k = 3) and 1.19 (k = 5) on [1, 4].
    assert float(power_law_icdf(torch.tensor(0.5), 1.0, 4.0, 3.0)) == pytest.approx(1.37, abs=0.01)
    assert float(power_law_icdf(torch.tensor(0.5), 1.0, 4.0, 5.0)) == pytest.approx(1.19, abs=0.01)


def test_mixed_fraction_and_uniform():
    g = torch.Generator().manual_seed(1)
    a = sample_alpha(100_000, dist="mixed", neg_cfg_pw=3.0, no_cfg_frac=0.5, generator=g)
    frac_one = float((a == 1.0).float().mean())
    assert abs(frac_one - 0.5) < 0.01
    rest = a[a != 1.0].double()
    assert abs(float(rest.median()) - float(power_law_icdf(torch.tensor(0.5), 1.0, 4.0, 3.0))) < 0.02
    u = sample_alpha(100_000, dist="uniform", cfg_min=1.0, cfg_max=3.0, generator=g).double()
    assert u.min() >= 1.0 and u.max() <= 3.0 and abs(float(u.mean()) - 2.0) < 0.01
    with pytest.raises(ValueError, match="dist"):
        sample_alpha(3, dist="normal")
    with pytest.raises(ValueError, match="cfg_min"):
        sample_alpha(3, cfg_min=0.5)


def test_style_token_override_reaches_the_model():
    from drift.model import build_generator_model
    base = TrainConfig.from_preset("tiny")
    assert "num_style_tokens" not in base.model_kwargs()  # -1: the preset's 32
    assert build_generator_model(base, 4, 8, 1).num_style_tokens == 32
    for n in (0, 4):
        cfg = TrainConfig.from_preset("tiny", num_style_tokens=n)
        m = build_generator_model(cfg, 4, 8, 1)
        assert m.num_style_tokens == n and m.sample_style(3).shape == (3, n)
        out = m(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3]), torch.ones(3))
        assert out.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("d, word", [
    ({"R_list": "12"}, "R_list must be a list of numbers"),  # not (1.0, 2.0)
    ({"R_list": "0.05"}, "R_list must be a list of numbers"),
    ({"R_list": [0.1, "x"]}, "R_list must be a list of numbers"),
    ({"R_list": [float("inf")]}, "R_list must hold finite numbers"),
    ({"ema_decay": None}, "ema_decay is null"),
    ({"lr": None}, "lr is null"),
    ({"max_steps": None}, "max_steps is null"),
    ({"model": None}, "model is null"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": True}, "lr must be a number"),
    ({"compile": "yes"}, "compile must be a bool"),
    ({"out_dir": 3}, "out_dir must be a string"),
    ({"ema_decay": [0.9, 0.9]}, "ema_decay must not repeat"),
    ({"adam_beta2": 1.0}, "adam_beta2 must be in"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"out_dir": ""}, "out_dir must not be empty"),
])
def test_every_config_value_is_checked_naming_the_key(d, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig.from_dict(dict(PRESETS["demo"], **d)).validate()


def test_fields_set_in_code_are_checked_too():
    with pytest.raises(ValueError, match="R_list must be a list of numbers"):
        TrainConfig(R_list="12").validate()
    with pytest.raises(ValueError, match="ema_decay is null"):
        TrainConfig(ema_decay=None).validate()
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("inf")).validate()


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        parse_cli(["--preset", "demo", "--config", str(bad)])
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: must hold a JSON object"):
        parse_cli(["--preset", "demo", "--config", str(lst)])
    r = tmp_path / "r.json"
    r.write_text('{"R_list": "12"}')
    with pytest.raises(ValueError, match="R_list"):
        parse_cli(["--preset", "demo", "--config", str(r)])
    with pytest.raises(ValueError, match="lr must be a finite number"):
        parse_cli(["--preset", "demo", "--lr", "nan"])


@pytest.mark.parametrize("dist", ["power", "uniform"])
def test_no_cfg_frac_applies_with_every_sampler(dist):
    # official train.py: cfg = where(u2 < no_cfg_frac, 1, cfg) after the sampler, whichever it is
    a = sample_alpha(100_000, dist=dist, cfg_min=1.5, cfg_max=3.0, no_cfg_frac=0.25,
                     generator=torch.Generator().manual_seed(2))
    assert abs(float((a == 1.0).float().mean()) - 0.25) < 0.01
    rest = a[a != 1.0]
    assert rest.min() >= 1.5 and rest.max() <= 3.0  # the rest keeps the sampler's range
    none = sample_alpha(10_000, dist=dist, cfg_min=1.5, cfg_max=3.0, generator=torch.Generator().manual_seed(2))
    assert bool((none >= 1.5).all())


def test_mixed_is_the_power_law_with_no_cfg_frac():
    kw = dict(neg_cfg_pw=3.0, no_cfg_frac=0.5)
    a = sample_alpha(1000, dist="mixed", generator=torch.Generator().manual_seed(3), **kw)
    b = sample_alpha(1000, dist="power", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
