"""shardlib.factored: factored updates and their algebra."""

import pytest
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


def test_best_rank_matches_the_truncated_svd_on_rank_deficient_events():
    """The Gram-matrix route gives the truncated SVD: zero events, events of rank below ``rank``, full ones;
    each factor pair carries sqrt(sigma_k) on both sides, in descending order."""
    from shardlib.factored import Factored, best_rank

    g = torch.Generator().manual_seed(1)
    E, m, do, di = 4, 9, 40, 30
    left = torch.randn(E, m, do, generator=g, dtype=torch.float64)
    right = torch.randn(E, m, di, generator=g, dtype=torch.float64)
    left[0] = 0  # an all-zero event
    left[1, 1:] = 0  # rank 1
    right[2, 2:] = right[2, :2].sum(0)  # rank 2 (the other rows repeat a sum of the first two): below rank 3
    f = Factored(left, right)
    dense = f.dense()
    U, sv, Vh = torch.linalg.svd(dense)
    out, kept = best_rank(f, 3)
    assert out.left.shape == (E, 3, do) and out.right.shape == (E, 3, di)
    for e in range(E):
        best = (U[e, :, :3] * sv[e, :3]) @ Vh[e, :3]
        assert torch.allclose(out.dense()[e], best, atol=1e-9 * (1 + dense[e].norm()))
    total = (sv**2).sum(1)
    want = torch.where(total > 0, (sv[:, :3] ** 2).sum(1) / total.clamp(min=1e-300), torch.ones(E, dtype=total.dtype))
    assert torch.allclose(kept, want, atol=1e-10)
    assert (out.left[1, 1:] == 0).all() and (out.right[1, 1:] == 0).all()  # rank 1: the other factors are zero
    norms_l, norms_r = out.left.norm(dim=2), out.right.norm(dim=2)
    assert torch.allclose(norms_l, norms_r) and torch.allclose(norms_l**2, sv[:, :3] * (sv[:, :3] > 1e-8), atol=1e-9)
    assert (norms_l[:, :-1] >= norms_l[:, 1:] - 1e-12).all()


def test_best_rank_in_float32_gives_zero_factors_beyond_an_events_rank_not_noise():
    """float32 Grams carry rounding eigenvalues: an event of rank 2 asked for rank 4 gets two balanced factor
    pairs and two zero ones, and its product is the event."""
    from shardlib.factored import Factored, best_rank

    g = torch.Generator().manual_seed(2)
    left = torch.randn(3, 12, 50, generator=g)
    right = torch.randn(3, 12, 40, generator=g)
    mix = torch.randn(3, 12, 2, generator=g)
    left = mix @ left[:, :2]  # every row a mix of two: rank 2 on the left side
    f = Factored(left, right)
    out, kept = best_rank(f, 4)
    assert out.left.dtype == torch.float32 and (out.left[:, 2:] == 0).all() and (out.right[:, 2:] == 0).all()
    nl, nr = out.left[:, :2].norm(dim=2), out.right[:, :2].norm(dim=2)
    assert torch.allclose(nl, nr, rtol=1e-3)
    dense = f.dense()
    assert torch.allclose(out.dense(), dense, atol=1e-5 * float(dense.abs().max()))
    assert torch.allclose(kept, torch.ones(3), atol=1e-5)


def test_randomized_rank_is_near_the_truncated_svd_and_its_kept_share_is_exact():
    """A dense matrix with a slowly decaying spectrum (as an Adam step's): the randomized factors keep within
    1% of the Eckart-Young share, the kept label is the share their product actually keeps, a matrix of rank
    below ``rank`` comes back exactly, a zero one as zero factors, and the sketch's seed makes it repeatable."""
    from shardlib.factored import randomized_rank

    g = torch.Generator().manual_seed(3)
    E, do, di = 3, 60, 80
    U = torch.linalg.qr(torch.randn(E, do, do, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(E, di, do, generator=g, dtype=torch.float64)).Q
    sv = torch.arange(1, do + 1, dtype=torch.float64) ** -0.5  # slowly decaying: no clean low rank
    dense = (U * sv) @ V.transpose(1, 2)
    dense[1] = (U[1, :, :3] * sv[:3]) @ V[1, :, :3].T  # rank 3
    dense[2] = 0
    f, kept = randomized_rank(dense, 8)
    assert f.left.shape == (E, 8, do) and f.right.shape == (E, 8, di)
    best = (sv[:8] ** 2).sum() / (sv**2).sum()
    assert best - 0.01 < kept[0] <= best + 1e-12
    err = ((f.dense() - dense) ** 2).sum((1, 2)) / (dense**2).sum((1, 2)).clamp(min=1e-300)
    assert torch.allclose(err[:2], 1 - kept[:2], atol=1e-10)  # the label is what the factors keep
    assert torch.allclose(f.dense()[1], dense[1], atol=1e-10) and kept[1] == pytest.approx(1.0)
    assert (f.left[2] == 0).all() and kept[2] == 1
    assert torch.allclose(f.left[0].norm(dim=1), f.right[0].norm(dim=1))  # singular values split evenly
    again, _ = randomized_rank(dense, 8)
    assert torch.equal(again.left, f.left) and torch.equal(again.right, f.right)
