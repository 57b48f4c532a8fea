"""shardlib.factored: factored updates and their algebra."""

import torch

from shardlib.factored import factorize


def test_factorize_exact_and_compressed_match_the_dense_update():

    g = torch.Generator().manual_seed(0)
    d, x = (
        torch.randn(4, 7, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 7, 6, generator=g, dtype=torch.float64),
    )
    dense = torch.einsum("eto,eti->eoi", d, x)
    f, kept = factorize(d, x)
    assert torch.allclose(f.dense(), dense.float(), rtol=1e-5, atol=1e-5) and (kept == 1).all()
    assert torch.allclose(f.sq_norms(), (dense.float() ** 2).sum((1, 2)), rtol=1e-5)
    c, kept = factorize(d, x, max_rank=5)  # rank(U_e) <= min(5, 6, 7) = 5: exact
    assert c.left.shape == (4, 5, 5) and torch.allclose(c.dense(), dense.float(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(kept, torch.ones(4), atol=1e-5)
    c2, kept2 = factorize(d, x, max_rank=2)
    sv = torch.linalg.svdvals(dense)
    best = (sv[:, :2] ** 2).sum(1) / (sv**2).sum(1)  # Eckart-Young: the best rank-2 keeps this share
    assert torch.allclose(kept2.double(), best, rtol=1e-4)
    err = ((c2.dense().double() - dense) ** 2).sum((1, 2)) / (dense**2).sum((1, 2))
    assert torch.allclose(err, 1 - best, rtol=1e-3, atol=1e-5)
