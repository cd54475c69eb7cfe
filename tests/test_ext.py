"""The C++ extension drift._C builds, registers its ops with torch.library, and matches an fp64 reference."""
import pytest
import torch

from drift import _ext


def test_extension_is_built():
    assert _ext.HAS_C_EXT, "drift._C missing: run `make build`"
    assert _ext._C.num_threads() >= 1


@pytest.mark.parametrize("B,G,M,S", [(3, 5, 9, 7), (1, 1, 1, 1), (4, 13, 17, 31)])
def test_weighted_dist_rowsum_matches_fp64(B, G, M, S):
    g = torch.Generator().manual_seed(B + G + M + S)
    gen = torch.randn(B, G, S, generator=g)
    tgt = torch.randn(B, M, S, generator=g)
    tw = torch.rand(B, M, generator=g)
    ref64 = (torch.cdist(gen.double(), tgt.double()).clamp_min(1e-4) * tw.double()[:, None]).sum((1, 2))
    # plain torch in fp32 with the same expanded-form distance sets the error scale for the 2x rule
    d2 = (gen ** 2).sum(-1, keepdim=True) + (tgt ** 2).sum(-1)[:, None] - 2 * gen @ tgt.transpose(1, 2)
    torch32 = (d2.clamp_min(1e-8).sqrt() * tw[:, None]).sum((1, 2))
    base = (torch32.double() - ref64).abs().max().item()
    out = _ext.weighted_dist_rowsum(gen, tgt, tw)
    assert out.dtype == torch.float32
    assert (out.double() - ref64).abs().max().item() <= 2 * base + 1e-5 * ref64.abs().max().item()
    out64 = _ext.weighted_dist_rowsum(gen.double(), tgt.double(), tw.double())
    torch.testing.assert_close(out64, ref64, rtol=1e-12, atol=1e-12)


def test_weighted_dist_rowsum_opcheck_and_errors():
    gen, tgt, tw = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.rand(2, 5)
    torch.library.opcheck(torch.ops.drift.weighted_dist_rowsum.default, (gen, tgt, tw),
                          test_utils=("test_schema", "test_autograd_registration"))
    with pytest.raises(RuntimeError, match="S mismatch"):
        _ext.weighted_dist_rowsum(gen, torch.randn(2, 5, 3), tw)
    with pytest.raises(RuntimeError, match="M mismatch"):
        _ext.weighted_dist_rowsum(gen, tgt, torch.rand(2, 4))
