"""shardlib.sae_parts: the per-tensor parts of a ShardSAE (the rest of their behaviour is tested through the SAE
in test_sae.py)."""

import torch

from shardlib.sae_parts import top_svd


def test_top_svd_is_the_svd_where_the_rank_is_small_and_close_to_it_otherwise():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 70, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(low, full_matrices=False)
    u, s, vh = top_svd(low, 3)  # rank 9 <= 3 + oversample: exact to rounding
    assert u.shape == (40, 3) and s.shape == (3,) and vh.shape == (3, 70)
    assert torch.allclose(s, S[:3]) and torch.allclose((u * s) @ vh, (U[:, :3] * S[:3]) @ Vh[:3])
    full = torch.randn(60, 80, generator=g, dtype=torch.float64)  # a flat spectrum: the hardest case
    s, S = top_svd(full, 4)[1], torch.linalg.svdvals(full)[:4]
    assert ((s / S) > 0.9).all() and (s <= S * (1 + 1e-9)).all()  # never above the true singular values
    assert torch.equal(top_svd(full, 4)[1], s)  # its own generator: the same result every call
    state = torch.get_rng_state()
    top_svd(full, 4)
    assert torch.equal(state, torch.get_rng_state())  # the global random stream is untouched
    small = torch.randn(5, 6, generator=g, dtype=torch.float64)  # r + oversample covers it: the full SVD
    assert torch.allclose(top_svd(small, 2)[1], torch.linalg.svdvals(small)[:2])


def test_the_gram_of_one_set_of_factors_has_autograds_values_and_gradients():
    from shardlib.sae_parts import factor_gram

    g = torch.Generator().manual_seed(1)
    U = torch.randn(5, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    V = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    U2, V2 = U.detach().clone().requires_grad_(), V.detach().clone().requires_grad_()
    w = torch.randn(5, 5, generator=g, dtype=torch.float64)
    own = factor_gram(U, V, U, V)
    ref = factor_gram(U2, V2, U2 * 1, V2 * 1)  # two distinct tensors: autograd's own backward
    dense = torch.einsum("fro,fri->foi", U, V).reshape(5, -1)
    assert torch.allclose(own, ref) and torch.allclose(own, dense @ dense.T)
    (own * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(U.grad, U2.grad) and torch.allclose(V.grad, V2.grad)
    assert torch.autograd.gradcheck(lambda u, v: factor_gram(u, v, u, v), (U.detach().requires_grad_(), V))


def test_centred_events_give_the_inner_products_and_gradients_of_their_concatenated_factors():
    """A :class:`Centered` batch (events less one shared matrix b) is the Factored batch of both sets of factors;
    factor_inner reads b's factors once, with the values and gradients of the concatenated batch."""
    from shardlib.factored import Factored
    from shardlib.sae_parts import Centered, factor_inner

    g = torch.Generator().manual_seed(0)
    x = Factored(torch.randn(5, 3, 7, generator=g), torch.randn(5, 3, 6, generator=g))
    out = []
    for centred in (True, False):
        bl = torch.randn(1, 2, 7, generator=torch.Generator().manual_seed(1)).requires_grad_()
        br = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
        U = torch.randn(4, 2, 7, generator=torch.Generator().manual_seed(3)).requires_grad_()
        V = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(4)).requires_grad_()
        b = Factored(bl, br)
        y = Centered(x, b) if centred else x.minus(Factored(bl.expand(5, 2, 7), br.expand(5, 2, 6)))
        assert torch.equal(y.left, x.minus(Factored(bl.expand(5, 2, 7), br.expand(5, 2, 6))).left)
        s = factor_inner(y, U, V)
        (s * torch.arange(20.0).view(5, 4)).sum().backward()
        out.append((s.detach(), bl.grad, br.grad, U.grad, V.grad))
        if centred:
            assert isinstance(y.detach(), Centered) and isinstance(y.to(torch.float64), Centered)
            assert y.to(torch.float64).left.dtype == torch.float64
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
