"""DriftDiT generator (drift.model): presets, init, determinism, conditioning, compile, autocast, errors."""
import json
import math

import pytest
import torch
import torch._inductor.config  # noqa: F401  (config.patch in the compile test)

from drift.model import (DRIFT_MODELS, DriftDiT, apply_rope, get_2d_sincos_pos_embed, rope_tables,
                         swiglu_hidden_dim)

PAPER_PRESETS = {  # paper Table 5/6 parameter counts (num_classes=1000)
    "DriftDiT-B/2": 133e6,
    "DriftDiT-L/2": 463e6,
    "DriftDiT-B/16": 134e6,
    "DriftDiT-L/16": 464e6,
}
SMALL_PRESETS = [name for name in DRIFT_MODELS if name not in PAPER_PRESETS]


def _tiny(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    cfg.update(kw)
    return DriftDiT(**cfg)


def _randomize_zero_init(model, seed=0):
    """Give the zero-initialized adaLN / output layers random values so the output depends on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    labels = torch.randint(0, model.num_classes, (n,), generator=g)
    alpha = 1 + 3 * torch.rand(n, generator=g)
    style = model.sample_style(n, generator=g)
    return noise, labels, alpha, style


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_paper_preset_param_counts(name):
    with torch.device("meta"):
        model = DRIFT_MODELS[name](num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PAPER_PRESETS[name]) <= 0.01 * PAPER_PRESETS[name], f"{name}: {n / 1e6:.2f}M"


def test_swiglu_width_and_official_constants():
    assert swiglu_hidden_dim(768) == 2048 and swiglu_hidden_dim(1024) == 2752
    m = _tiny()
    assert m.num_style_tokens == 32 and m.style_codebook_size == 64
    assert m.style_embedder.weight.shape == (32 * 64, 32)  # 32 separate 64-entry codebooks
    assert m.cls_embed.shape == (1, 16, 32)


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_paper_preset_shapes_on_meta(name):
    with torch.device("meta"):
        model = DRIFT_MODELS[name](num_classes=1000)
        noise = torch.empty(2, model.in_channels, model.input_size, model.input_size)
        out = model(noise, torch.zeros(2, dtype=torch.long), torch.ones(2))
    assert out.shape == noise.shape
    assert (model.input_size, model.in_channels) == ((32, 4) if name.endswith("/2") else (256, 3))


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_presets_run(name):
    # depth trimmed for the widest preset only to keep the suite fast; the width and patching are real
    kw = {"depth": 2} if name == "DriftDiT-S/2" else {}
    model = DRIFT_MODELS[name](**kw)
    assert (model.input_size, model.in_channels, model.num_classes) == (28, 1, 10)
    noise, labels, alpha, style = _inputs(model, 1)
    out = model(noise, labels, alpha, style)
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    # every preset accepts input_size / in_channels / num_classes overrides (32x32x3, 100 classes)
    model = DRIFT_MODELS[name](input_size=32, in_channels=3, num_classes=100, depth=1)
    noise, labels, alpha, style = _inputs(model, 2)
    assert model(noise, labels, alpha, style).shape == (2, 3, 32, 32)


def test_zero_init_output_is_exactly_zero_then_moves_after_one_step():
    torch.manual_seed(0)
    model = _tiny()
    noise, labels, alpha, style = _inputs(model, 4)
    out = model(noise, labels, alpha, style)
    assert torch.count_nonzero(out) == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn_like(noise)
    (model(noise, labels, alpha, style) - target).square().mean().backward()
    opt.step()
    out = model(noise, labels, alpha, style)
    assert torch.count_nonzero(out) == out.numel()


def test_meta_build_then_initialize_matches_eager_build():
    torch.manual_seed(1)
    eager = _tiny()
    torch.manual_seed(2)
    eager.initialize_weights()
    with torch.device("meta"):
        lazy = _tiny()
    lazy.to_empty(device="cpu")
    torch.manual_seed(2)
    lazy.initialize_weights()  # must set every parameter (to_empty leaves garbage)
    for (n1, p1), (n2, p2) in zip(eager.state_dict().items(), lazy.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    rebuilt = DriftDiT(**json.loads(json.dumps(lazy.config)))  # the config survives a JSON round trip
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in lazy.named_parameters()]
    expect = get_2d_sincos_pos_embed(32, 4).float()
    assert torch.equal(lazy.pos_embed[0], expect)
    assert lazy.pos_embed.requires_grad  # learnable absolute position embedding


def test_determinism_and_conditioning():
    torch.manual_seed(0)
    model = _randomize_zero_init(_tiny()).eval()
    noise, labels, alpha, style = _inputs(model, 3)
    out = model(noise, labels, alpha, style)
    assert torch.equal(out, model(noise, labels, alpha, style))
    # each input changes the output: noise, label, alpha and every single style position
    assert not torch.allclose(out, model(noise.flip(0), labels, alpha, style))
    assert not torch.allclose(out, model(noise, (labels + 1) % 5, alpha, style))
    assert not torch.allclose(out, model(noise, labels, alpha + 0.5, style))
    for pos in (0, 31):
        s2 = style.clone()
        s2[:, pos] = (s2[:, pos] + 1) % 64
        assert not torch.allclose(out, model(noise, labels, alpha, s2))
    # samples are independent of each other (no batch coupling)
    assert torch.allclose(out[1:2], model(noise[1:2], labels[1:2], alpha[1:2], style[1:2]), atol=1e-6)
    # style=None: random, but reproducible under torch.manual_seed
    torch.manual_seed(5)
    a = model(noise, labels, alpha)
    torch.manual_seed(5)
    b = model(noise, labels, alpha)
    torch.manual_seed(6)
    c = model(noise, labels, alpha)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sample_style():
    model = _tiny()
    s = model.sample_style(500, generator=torch.Generator().manual_seed(0))
    assert s.shape == (500, 32) and s.dtype == torch.int64
    assert int(s.min()) == 0 and int(s.max()) == 63
    assert torch.equal(s, model.sample_style(500, generator=torch.Generator().manual_seed(0)))


def test_patchify_roundtrip():
    model = _tiny(patch_size=4, in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 4, 48)
    # token 1 is the top-right patch, features ordered (row, col, channel)
    assert torch.equal(tokens[0, 1].view(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(model.unpatchify(tokens), x)


def test_rope_is_relative_and_norm_preserving():
    cos, sin = rope_tables(12, 8, "cpu")
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    dots = (qr[0, 0] @ kr[0, 0].T)  # (12, 12): depends only on j - i
    for off in (-3, 0, 5):
        d = torch.diagonal(dots, off)
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-4)
    assert not torch.allclose(torch.diagonal(dots, 0)[0], torch.diagonal(dots, 1)[0])


def test_grad_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    model = _randomize_zero_init(_tiny())
    noise, labels, alpha, style = _inputs(model, 3)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(noise, labels, alpha, style).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_bf16_autocast_runs_with_fp32_conditioning():
    torch.manual_seed(0)
    model = _randomize_zero_init(_tiny())
    noise, labels, alpha, style = _inputs(model, 3)
    ref = model(noise, labels, alpha, style)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = model.embed_condition(labels, alpha, style)
        out = model(noise, labels, alpha, style)
    assert c.dtype == torch.float32
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _randomize_zero_init(_tiny(depth=1, in_channels=1)).eval()
    noise, labels, alpha, style = _inputs(model, 2)
    # compile_threads=1: no worker pool to spawn, which costs more than it saves for one tiny graph on 2 cores
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        ref = model(noise, labels, alpha, style)
        out = torch.compile(model, fullgraph=True)(noise, labels, alpha, style)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    noise, labels, alpha, style = _inputs(model, 2)
    with pytest.raises(ValueError, match=r"noise must have shape \[N, 2, 8, 8\]"):
        model(noise[:, :1], labels, alpha, style)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(noise, labels.float(), alpha, style)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        model(noise, labels[:1], alpha, style)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        model(noise, labels + 5, alpha, style)
    with pytest.raises(ValueError, match="alpha must be a float tensor"):
        model(noise, labels, alpha.long(), style)
    with pytest.raises(ValueError, match=r"style must be an integer tensor of shape \[2, 32\]"):
        model(noise, labels, alpha, style[:, :16])
    with pytest.raises(ValueError, match=r"style indices must lie in \[0, 64\)"):
        model(noise, labels, alpha, style + 64)
    with pytest.raises(ValueError, match="input_size=30 is not divisible by patch_size=4"):
        DRIFT_MODELS["DriftDiT-T/4"](input_size=30)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        _tiny(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        _tiny(num_classes=0)


def test_sincos_pos_embed_layout():
    pe = get_2d_sincos_pos_embed(8, 2)  # raster order; first half encodes the column, second half the row
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    assert torch.allclose(pe[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0], dtype=torch.float64))
    assert torch.allclose(pe[1], torch.tensor([s1, s2, c1, c2, 0, 0, 1, 1], dtype=torch.float64))
    assert torch.allclose(pe[2], torch.tensor([0, 0, 1, 1, s1, s2, c1, c2], dtype=torch.float64))


def test_initialization_follows_the_official_layers():
    torch.manual_seed(0)
    with torch.device("meta"):
        m = DRIFT_MODELS["DriftDiT-B/2"]()
    m.to_empty(device="cpu")
    m.initialize_weights()
    # SwiGLU: the official W1 and W3 are separate xavier-uniform Linears 768 -> 2048 (std 0.0266); one xavier
    # over the fused [4096, 768] matrix would give std 0.0203
    w = m.blocks[0].mlp.w12.weight.detach()
    xavier_std = math.sqrt(2.0 / (768 + 2048))
    bound = math.sqrt(6.0 / (768 + 2048))
    for half in w.chunk(2, dim=0):
        assert abs(float(half.std()) - xavier_std) / xavier_std < 0.01 and float(half.abs().max()) <= bound
    assert xavier_std == pytest.approx(0.0266, abs=1e-4)
    # the alpha embedder's Linears: official weight_init="normal" -> N(0, 0.02), zero bias
    for linear in (m.alpha_embedder.mlp[0], m.alpha_embedder.mlp[2]):
        weight = linear.weight.detach()
        assert abs(float(weight.std()) - 0.02) < 0.0005 and float(weight.abs().max()) > 0.06  # normal, not uniform
        assert float(linear.bias.detach().abs().max()) == 0.0


def test_attn_fp32_runs_attention_in_fp32_under_bf16_autocast(monkeypatch):
    # The official `attn_fp32` keeps attention in fp32 under bf16 autocast. Autocast casts SDPA's inputs to bf16,
    # so the upcast alone is undone; the module must switch autocast off around the call.
    import drift.model as model_mod
    from drift.model import Attention
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        out = real(q, k, v, *a, **kw)
        seen.append((q, k, v, out))
        return out

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    errs = {}
    for fp32 in (True, False):
        attn = Attention(64, 4, attn_fp32=fp32)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(x, *rope_tables(16, 16, "cpu"))
        q, k, v, out = seen[0]
        qf, kf, vf = (t.double() for t in (q, k, v))
        ref = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(qf.shape[-1]), dim=-1) @ vf
        errs[fp32] = (out.double() - ref).abs().max().item()
    assert errs[True] < 1e-5 < errs[False], errs  # fp32 attention vs what bf16 autocast would give
