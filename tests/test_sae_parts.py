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
