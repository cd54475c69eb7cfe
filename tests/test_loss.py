"""drifting_loss: its value, its gradient (the field), and its dtype behaviour."""
import pytest
import torch

from drift.field import drifting_field
from drift.loss import drifting_loss
from tests.utils import make_field_inputs


@pytest.mark.parametrize("B,G,P,U,S", [(3, 5, 4, 2, 7), (2, 1, 3, 0, 4), (1, 8, 1, 3, 1)])
def test_gradient_is_the_scaled_field(B, G, P, U, S):
    """d(sum_b loss_b)/d gen = -2 force / (G * S * scale_inputs), row by row (autograd check, fp64)."""
    gen, pos, neg, w = make_field_inputs(B, G, P, U, S, dtype=torch.float64)
    gen.requires_grad_(True)
    loss, info = drifting_loss(gen, pos, neg, w, backend="reference")
    (grad,) = torch.autograd.grad(loss.sum(), gen)
    field = drifting_field(gen.detach(), pos, neg, w, backend="reference")
    expected = -2.0 * field.force / (G * S * field.scale_inputs)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(info["scale_inputs"], field.scale_inputs, rtol=0, atol=0)


def test_loss_value_is_mean_force_squared():
    gen, pos, neg, w = make_field_inputs(4, 6, 5, 3, 9, dtype=torch.float64)
    loss, _ = drifting_loss(gen, pos, neg, w, backend="reference")
    force = drifting_field(gen, pos, neg, w, backend="reference").force
    torch.testing.assert_close(loss, (force ** 2).mean(dim=(1, 2)), rtol=1e-12, atol=0)
    # per-temperature normalization: over all rows, each R contributes unit mean square, so with uncorrelated
    # directions the mean loss is O(len(R)) (not a convergence signal; force_rms is)
    assert 0.5 < loss.mean().item() < 3 * 3


def test_gradient_flows_only_through_gen():
    gen, pos, neg, w = make_field_inputs(2, 4, 3, 2, 5)
    for t in (gen, pos, neg, w):
        t.requires_grad_(True)
    loss, _ = drifting_loss(gen, pos, neg, w, backend="reference")
    grads = torch.autograd.grad(loss.sum(), (gen, pos, neg, w), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gen_gets_fp32_loss_and_own_dtype_grad(dtype):
    gen, pos, neg, w = make_field_inputs(2, 4, 3, 2, 5, dtype=dtype)
    gen.requires_grad_(True)
    loss, _ = drifting_loss(gen, pos, neg, w, backend="reference")
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss.sum(), gen)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


def test_batch_dims_loss_shape():
    gen, pos, neg, w = make_field_inputs(0, 3, 4, 2, 5, batch_shape=(2, 3))
    loss, _ = drifting_loss(gen, pos, neg, w, backend="reference")
    assert loss.shape == (2, 3)


def test_descending_the_loss_moves_gen_toward_positives():
    """A few plain gradient steps on gen alone shrink the distance to a shifted positive cloud."""
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(1, 64, 2, generator=g, dtype=torch.float64)
    pos = torch.randn(1, 64, 2, generator=g, dtype=torch.float64) + torch.tensor([4.0, 0.0], dtype=torch.float64)
    x = gen.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=5.0)
    for _ in range(50):
        loss, _ = drifting_loss(x, pos, backend="reference")
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    before = (gen.mean(1) - pos.mean(1)).norm()
    after = (x.detach().mean(1) - pos.mean(1)).norm()
    assert after < 0.25 * before, (before, after)
