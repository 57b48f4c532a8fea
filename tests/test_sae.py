"""ShardSAE pinned against dense reference computations (SAELens-style)."""

import pytest
import torch

from shardlib.sae import ShardSAE, aux_loss
from shardlib.trainer import TrainConfig, Trainer, init_from_data

SHAPES = {"w": (6, 5), "u": (4, 6), "b": (6,)}


def dense_dirs(sae, which="dec"):
    """Dense [F, D] directions from the factors (reference; materializes what the SAE never does)."""
    parts = []
    for n, part in zip(sae.names, getattr(sae, which).values()):
        if sae.lowrank(n):
            parts.append(torch.einsum("fro,fri->foi", part.U, part.V).reshape(sae.n_latents, -1))
        else:
            parts.append(part.W.reshape(sae.n_latents, -1))
    return torch.cat(parts, 1)


def trainer(sae, variance=1.0, total_steps=None, **kw):
    """A Trainer without restarts or a firing threshold unless asked for."""
    return Trainer(sae, TrainConfig(**{"resample_dead": False, "fire_frac": 0.0, **kw}), variance, None, total_steps)


def flat(x):
    return torch.cat([x[n].reshape(x[n].shape[0], -1) for n in SHAPES], 1)


def batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("rank", [1, 3, 0])
def test_lowrank_encoder_scores_equal_dense_inner_products(rank):
    sae = ShardSAE(SHAPES, 7, 3, rank=rank, seed=0)
    with torch.no_grad():
        for p in sae.enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.b_enc.normal_()
    x = batch()
    y = sae.center(x)
    ref = flat(y) @ dense_dirs(sae, "enc").T + sae.b_enc
    assert torch.allclose(sae.pre_acts(y), ref, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 0])
@pytest.mark.parametrize("signed", [False, True])
def test_reconstruction_equals_dense_decoder(rank, signed):
    sae = ShardSAE(SHAPES, 7, 3, rank=rank, signed=signed, seed=1)
    with torch.no_grad():
        for p in sae.dec.parameters():
            p.mul_(1.7)  # unnormalized factors: the forward pass must divide the norm out
    x = batch()
    xhat, z, a, y = sae(x)
    D = dense_dirs(sae, "dec")
    D = D / D.norm(dim=1, keepdim=True)
    bias = torch.cat([b.value().reshape(-1) for b in sae.b_pre.values()])
    assert torch.allclose(flat(xhat), z @ D + bias, atol=1e-5)
    assert ((z != 0).sum(1) <= 3).all()
    if signed:
        assert (z < 0).any()  # signed TopK keeps negative coefficients
    else:
        assert (z >= 0).all()


@pytest.mark.parametrize("rank", [2, 0])
def test_decoding_differentiates_through_the_used_latents_norms_only_with_the_full_gradient(rank):
    # decode_active divides by the norms of the latents it uses; the gradient must be the one through every norm
    sae = ShardSAE(SHAPES, 7, 3, rank=rank, seed=2)
    with torch.no_grad():
        for p in sae.dec.parameters():
            p.mul_(1.3)
    used = torch.tensor([4, 1])
    assert torch.equal(sae.decoder_norms(used), sae.decoder_norms()[used])
    x = batch()
    xhat, z, _, _ = sae(x)
    flat(xhat).square().sum().backward()
    got = [p.grad.clone() for p in sae.dec.parameters()]
    sae.zero_grad()
    D = dense_dirs(sae, "dec")
    bias = torch.cat([b.value().reshape(-1) for b in sae.b_pre.values()])
    (z.detach() @ (D / D.norm(dim=1, keepdim=True)) + bias).square().sum().backward()
    for g, p in zip(got, sae.dec.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_topk_picks_the_k_largest():
    sae = ShardSAE({"v": (3,)}, 5, 2, rank=0)
    a = torch.tensor([[0.1, 0.5, -2.0, 0.3, 0.2]])
    assert torch.equal(sae.activate(a), torch.tensor([[0, 0.5, 0, 0.3, 0]]))
    sae.signed = True
    assert torch.equal(sae.activate(a), torch.tensor([[0, 0.5, -2.0, 0, 0]]))


def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    sae = ShardSAE({"v": (3,)}, 4, 2, rank=0, activation="batchtopk")
    a = torch.tensor([[5.0, 4.0, 3.0, 0.1], [0.2, 0.3, 0.1, 0.05]])
    z = sae.activate(a)
    assert int((z != 0).sum()) == 4 and (z[0, :3] != 0).all()
    assert sae.threshold.item() == pytest.approx(0.3)
    sae.eval()
    assert (sae.activate(a) != 0).sum().item() == 3  # inference: a > threshold


@pytest.mark.parametrize("rank", [1, 2, 0])
def test_decoder_directions_stay_unit_norm_after_training_steps(rank):
    sae = ShardSAE(SHAPES, 6, 2, rank=rank)
    tr = trainer(sae, lr=0.05, aux_k=3, dead_window=10)
    for s in range(5):
        tr.step(batch(8, s))
    assert torch.allclose(sae.decoder_norms(), torch.ones(6), atol=1e-4)
    D = torch.cat([v.reshape(6, -1) for v in sae.directions().values()], 1)
    assert torch.allclose(D.norm(dim=1), torch.ones(6), atol=1e-5)


def test_auxk_trains_a_forced_dead_latent_and_only_it():
    torch.manual_seed(0)
    sae = ShardSAE(SHAPES, 6, 2, rank=1)
    x = batch(16)
    xhat, z, a, y = sae(x)
    dead = torch.zeros(6, dtype=torch.bool)
    dead[3] = True
    xs = sae.scaled_input(x)
    sae.signed = True  # so the dead latent's coefficient is used whatever its sign
    loss = aux_loss(sae, a, y, xs, xhat, dead, k_aux=4)
    assert loss > 0
    loss.backward()
    g = sae.dec["0"].U.grad
    assert g[3].abs().sum() > 0
    assert torch.all(g[torch.arange(6) != 3] == 0)
    assert aux_loss(sae, a, y, xs, xhat, torch.zeros(6, dtype=torch.bool), 4).item() == 0.0


@pytest.mark.parametrize("aux_coef", [0.0, 1 / 32])
def test_auxk_trains_the_encoder_of_dead_latents(aux_coef):
    sae = ShardSAE({"w": (8, 8)}, 16, 2, rank=1, signed=True, seed=0)
    data = {"w": torch.randn(256, 8, 8, generator=torch.Generator().manual_seed(0))}
    init_from_data(sae, data)
    with torch.no_grad():
        sae.enc["0"].U[5:] = 0  # latents 5.. score 0 on every input: they never win TopK
    tr = trainer(sae, lr=0.01, aux_k=8, aux_coef=aux_coef, dead_window=64)
    for s in range(0, 256, 32):
        tr.step({"w": data["w"][s : s + 32]})
    assert tr.dead()[5:].all() or aux_coef > 0
    moved = sae.enc["0"].U[5:].abs().sum().item()
    assert (moved > 0) == (aux_coef > 0)  # only AuxK gives dead latents a gradient


def test_save_load_roundtrip(tmp_path):
    sae = ShardSAE(SHAPES, 5, 2, rank=2, signed=True)
    sae.scale.fill_(3.0)
    sae.save(tmp_path / "s")
    assert (tmp_path / "s" / "cfg.json").exists() and (tmp_path / "s" / "sae.safetensors").exists()
    back = ShardSAE.load(tmp_path / "s")
    x = batch()
    for k, v in sae(x).xhat.items():
        assert torch.equal(v, back(x).xhat[k])
    # a folder saved with the factors as [F, d, r] (before the [F, r, d] layout; no layout in the metadata)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "s" / "sae.safetensors"))
    old = {
        k: v.transpose(1, 2).contiguous() if k.split(".")[0] in ("dec", "enc") and k[-1] in "UV" else v
        for k, v in state.items()
    }
    assert old["dec.0.U"].shape == (5, SHAPES[next(iter(SHAPES))][0], 2)
    save_file(old, str(tmp_path / "s" / "sae.safetensors"))
    for k, v in ShardSAE.load(tmp_path / "s").state_dict().items():
        assert torch.equal(v, sae.state_dict()[k]), k


def test_lowrank_has_far_fewer_parameters_than_dense():
    big = {"w": (128, 64), "u": (64, 128)}
    lr, dense = ShardSAE(big, 32, 4, rank=1).n_parameters(), ShardSAE(big, 32, 4, rank=0).n_parameters()
    assert dense / lr > 10
    from shardlib.common import dense_parameter_count

    assert dense_parameter_count(big, 32) == dense


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="k=9"):
        ShardSAE(SHAPES, 4, 9)
    with pytest.raises(ValueError, match="activation"):
        ShardSAE(SHAPES, 4, 2, activation="relu")


def test_signed_coefficients_recover_a_signed_direction():
    """One planted direction used with both signs: a signed SAE needs one latent for it."""
    g = torch.Generator().manual_seed(0)
    d = torch.outer(torch.randn(6, generator=g), torch.randn(5, generator=g))  # a rank-1 direction
    d /= d.norm()
    c = torch.randn(512, generator=g)
    data = {"w": c[:, None, None] * d + 0.01 * torch.randn(512, 6, 5, generator=g)}
    sae = ShardSAE({"w": (6, 5)}, 2, 1, rank=1, signed=True, seed=0)
    init_from_data(sae, data)
    tr = trainer(sae, float((data["w"] / sae.scale).pow(2).sum() / 512), lr=0.01, aux_k=1, dead_window=10_000)
    for _epoch in range(30):
        for s in range(0, 512, 64):
            tr.step({"w": data["w"][s : s + 64]})
    cos = (sae.directions()["w"].reshape(2, -1) @ d.reshape(-1)).abs().max()
    assert cos > 0.99


def test_relative_learning_rate_divides_by_the_width_of_each_factor():
    sae = ShardSAE({"w": (8, 32), "b": (5,)}, 4, 2, rank=2)
    lrs = {id(p): g["lr"] for g in sae.param_groups(0.03) for p in g["params"]}
    assert lrs[id(sae.dec["0"].U)] == pytest.approx(0.03 / 8**0.5)
    assert lrs[id(sae.dec["0"].V)] == pytest.approx(0.03 / 32**0.5)
    assert lrs[id(sae.dec["1"].W)] == pytest.approx(0.03 / 5**0.5)
    assert lrs[id(sae.b_pre["0"].b)] == pytest.approx(0.03 / 256**0.5)
    low = ShardSAE({"w": (8, 32)}, 4, 2, rank=2, b_pre_rank=1)  # a low-rank b_pre: each factor by its width
    lrs = {id(p): g["lr"] for g in low.param_groups(0.03) for p in g["params"]}
    assert lrs[id(low.b_pre["0"].U)] == pytest.approx(0.03 / 8**0.5)
    assert lrs[id(low.b_pre["0"].V)] == pytest.approx(0.03 / 32**0.5)
    assert "b_enc" not in dict(sae.named_parameters())  # fixed at zero unless encoder_bias
    assert {id(p) for p in low.param_groups(0.03, relative=False)[0]["params"]} == set(lrs)
    assert "b_enc" in dict(ShardSAE({"w": (8, 32)}, 4, 2, encoder_bias=True).named_parameters())


def test_set_directions_of_some_latents_leaves_the_others():
    sae = ShardSAE({"w": (6, 5), "b": (4,)}, 5, 2, rank=1, seed=0)
    before = {n: v.clone() for n, v in sae.directions().items()}
    target = {"w": torch.outer(torch.arange(1.0, 7.0), torch.ones(5))[None], "b": torch.zeros(1, 4)}
    sae.set_directions_(target, latents=[3])
    after = sae.directions()
    for n in after:
        keep = torch.arange(5) != 3
        assert torch.allclose(after[n][keep], before[n][keep])
    t = target["w"][0] / target["w"][0].norm()
    assert torch.allclose(after["w"][3], t, atol=1e-5) and torch.allclose(sae.enc["0"].U[3], sae.dec["0"].U[3])


def test_dead_latents_are_restarted_at_the_worst_residual_and_fillers_count_as_dead():
    g = torch.Generator().manual_seed(0)
    sae = ShardSAE({"w": (8, 8)}, 4, 4, rank=1, signed=True, seed=0)
    with torch.no_grad():
        sae.enc["0"].U[3] *= 1e-4  # latent 3 scores ~0: TopK (k = all) keeps it only as a near-zero filler
    tr = trainer(sae, lr=1e-9, aux_k=2, aux_coef=0, dead_window=16, resample_dead=True, fire_frac=0.1)
    x = {"w": torch.randn(8, 8, 8, generator=g)}
    x["w"][5] *= 10  # the worst-reconstructed event
    first = tr.step(x)
    assert first["resampled"] == 0  # nothing is dead before dead_window samples
    tr.step(x)
    tr.step(x)
    assert tr.n_resampled >= 1
    d = sae.directions()["w"][3].flatten()
    r = (x["w"][5] / sae.scale - sae.b_pre["0"].b).detach().flatten()
    assert abs(float(d @ r / r.norm())) > 0.3  # rank 1 of the worst event's residual
    assert tr.last_fired[3] == tr.samples  # a new window to fire in
    plain = trainer(
        ShardSAE({"w": (8, 8)}, 4, 4, rank=1, signed=True, seed=0), lr=1e-9, aux_k=2, aux_coef=0, dead_window=16
    )
    with torch.no_grad():
        plain.sae.enc["0"].U[3] *= 1e-4
    for _ in range(3):
        plain.step(x)
    assert plain.n_resampled == 0 and not plain.dead()[3]  # fire_frac 0: a filler counts as firing


def test_a_dead_latent_restarts_at_the_residual_against_the_decoder_before_the_step():
    """The residual a restarted latent takes is the one of the batch's own forward pass (its codes and the decoder
    that made them), not one against the decoder after the step, which a large rate moves far."""
    import copy

    g = torch.Generator().manual_seed(0)
    sae = ShardSAE({"w": (4, 3)}, 8, 1, rank=0, signed=True, seed=0)
    tr = trainer(sae, lr=0.5, aux_k=1, aux_coef=0, dead_window=0, resample_dead=True)
    x = {"w": torch.randn(3, 4, 3, generator=g)}  # 3 events, 1 latent each: at least 5 of 8 latents die
    before = copy.deepcopy(sae)
    with torch.no_grad():
        out = before(x)
        resid = x["w"] / before.scale - out.xhat["w"]
    dead = torch.nonzero(~(out.codes != 0).any(0)).flatten()[:3]  # as many as there are events
    worst = (resid**2).sum((1, 2)).topk(3).indices
    tr.step(x)
    assert tr.n_resampled == 3
    for latent, event in zip(dead, worst):
        want = resid[event] / resid[event].norm()
        assert torch.allclose(sae.directions()["w"][latent], want, atol=1e-6)
        with torch.no_grad():  # the same codes against the decoder after the step: another residual
            after = x["w"][event] / sae.scale - sae.decode_active(out.codes[event][None])["w"][0]
        assert float((after / after.norm() - want).abs().max()) > 1e-2


def test_dead_latents_restart_only_within_restart_until_of_the_steps():
    """With ``restart_until`` 0.5 of 10 steps, latents that die keep being restarted in steps 0-4 and never after;
    at 1 (the default) they are restarted to the end (the rate stays above 0: no decay)."""
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(3, 4, 3, generator=g)}  # 3 events, 1 latent each: most of 8 latents die every step
    counts = {}
    for until in (0.5, 1.0):
        sae = ShardSAE({"w": (4, 3)}, 8, 1, rank=0, signed=True, seed=0)
        kw = dict(lr=0.5, aux_k=1, aux_coef=0, dead_window=0, resample_dead=True, lr_decay=0.0, restart_until=until)
        tr = trainer(sae, total_steps=10, **kw)
        counts[until] = [tr.step(x)["resampled"] for _ in range(10)]
    assert all(c > 0 for c in counts[0.5][:5]) and counts[0.5][5:] == [0.0] * 5
    assert all(c > 0 for c in counts[1.0])


def test_learning_rate_falls_to_zero_over_the_last_steps():
    sae = ShardSAE({"w": (4, 4)}, 3, 1, rank=1)
    tr = trainer(sae, total_steps=10, lr=0.1, aux_k=1, aux_coef=0, dead_window=100, lr_decay=0.5)
    factors = []
    for _ in range(10):
        factors.append(tr.lr_factor())
        tr.step({"w": torch.randn(4, 4, 4)})
    assert factors[:6] == [1.0] * 6 and factors[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])


# -- factored inputs: pinned against the same SAE on the dense twin --------------------------------

FSHAPES = {"w": (12, 10), "u": (10, 12), "b": (12,)}


def factored_batch(n=6, m=5, seed=0):
    from shardlib.updates import Factored

    g = torch.Generator().manual_seed(seed)
    return {
        "w": Factored(torch.randn(n, m, 12, generator=g), torch.randn(n, m, 10, generator=g)),
        "u": Factored(torch.randn(n, m, 10, generator=g), torch.randn(n, m, 12, generator=g)),
        "b": torch.randn(n, 12, generator=g),
    }


def densified(x):
    from shardlib.sae import dense

    return {n: dense(v) for n, v in x.items()}


def perturbed_sae(rank, signed, seed=0, **kw):
    sae = ShardSAE(FSHAPES, 9, 3, rank=rank, signed=signed, seed=seed, b_pre_rank=2, **kw)
    with torch.no_grad():
        sae.scale.fill_(1.7)
        for p in [*sae.enc.parameters(), *sae.dec.parameters(), *sae.b_pre.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return sae


def rel_close(a, b, tol=1e-5):
    a, b = (torch.as_tensor(t).detach().double() for t in (a, b))
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-12)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("signed", [False, True])
def test_factored_scores_reconstruction_and_losses_equal_the_dense_computation(rank, signed):
    """Scores, per-event errors, rec and AuxK losses, and every gradient, on factored events equal the same SAE
    on the dense events (1e-5 relative): the factored path's Gram-matrix errors against the dense path's
    decoded reconstructions."""
    from shardlib.sae import Factored, sae_loss

    x = factored_batch()
    dead = torch.zeros(9, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    results = []
    for inp in (x, densified(x)):
        torch.manual_seed(0)
        sae = perturbed_sae(rank, signed)
        loss, rec, aux, codes, sq_err = sae_loss(sae, inp, variance=3.0, dead=dead, aux_k=2, aux_coef=0.5)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in sae.named_parameters()}
        results.append((sae(inp), codes, sq_err, rec, aux, loss, grads))
    (fo, fz, ferr, frec, faux, floss, fg), (do, dz, derr, drec, daux, dloss, dg) = results
    assert isinstance(fo.xhat["w"], Factored) and isinstance(fo.centered["u"], Factored)
    assert not isinstance(do.xhat["w"], Factored)
    assert rel_close(fo.pre_acts, do.pre_acts) and torch.equal(fz != 0, dz != 0)
    assert rel_close(fz, dz) and rel_close(ferr, derr)
    for n in FSHAPES:
        assert rel_close(densified(fo.xhat)[n], do.xhat[n])
    assert aux > 0 and rel_close(frec, drec) and rel_close(faux, daux) and rel_close(floss, dloss)
    assert set(fg) == set(dg)
    for k in dg:
        assert rel_close(fg[k], dg[k]), k


def test_the_factored_loss_never_holds_each_events_active_factors():
    """The loss of a factored batch keeps for its backward no tensor with an axis of events times active
    latents times a matrix width (what decoding every event's k r factors held: 11 GB at rank 4 on SmolLM2):
    nothing it saves is larger than the batch's own factors (b_pre's included) or one factor parameter."""
    from shardlib.sae import sae_loss
    from shardlib.updates import Factored

    n, m, width, rank = 16, 3, 400, 4
    g = torch.Generator().manual_seed(0)
    x = {"w": Factored(torch.randn(n, m, width, generator=g), torch.randn(n, m, width, generator=g))}
    sae = ShardSAE({"w": (width, width)}, 8, 2, rank=rank, signed=True, seed=0, b_pre_rank=1)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sae_loss(sae, x, 1.0, torch.ones(8, dtype=torch.bool), 6, 1.0)
    out.loss.backward()
    assert out.aux > 0 and int((out.codes != 0).sum(1).max()) == 2
    assert max(sizes) <= max(n * (m + 1) * width, 8 * width * rank)
    assert max(sizes) < n * 6 * rank * width / 4  # decoding AuxK's 6 latents per event held this many


def test_a_factored_input_needs_a_low_rank_b_pre_and_a_dense_sae_densifies_it():
    x = factored_batch()
    with pytest.raises(ValueError, match="b_pre_rank > 0"):
        ShardSAE(FSHAPES, 9, 3, rank=1)(x)
    sae = ShardSAE(FSHAPES, 9, 3, rank=0, seed=0)  # the dense baseline takes factored events dense
    assert torch.allclose(sae(x).pre_acts, sae(densified(x)).pre_acts, atol=1e-5)


def test_factored_reconstruction_statistics_equal_dense_ones():
    from shardlib.metrics import ReconStats

    sae = perturbed_sae(2, True)
    x = factored_batch(n=8)
    stats = []
    for inp in (x, densified(x)):
        st = ReconStats()
        with torch.no_grad():
            out = sae(inp)
            st.update(sae.scaled_input(inp), out.xhat, out.codes)
        stats.append(st.result())
        st = ReconStats()  # from the per-event terms (Gram matrices for the factored batch)
        z, terms = sae.recon_terms(inp)
        st.update_terms(sae.scaled_input(inp), terms, z)
        stats.append(st.result())
    for got in stats[:3]:
        for key, v in stats[3].items():
            assert got[key] == pytest.approx(v, rel=1e-5), key


def test_restarting_a_latent_at_a_factored_residual_gives_the_dense_truncated_svd():
    x = factored_batch(n=3, m=4)
    a, b = ShardSAE(FSHAPES, 5, 2, rank=2, seed=0, b_pre_rank=1), ShardSAE(FSHAPES, 5, 2, rank=2, seed=0, b_pre_rank=1)
    from shardlib.shards import take

    a.set_directions_({n: take(v, [1]) for n, v in x.items()}, latents=[2])
    b.set_directions_({n: v[[1]] for n, v in densified(x).items()}, latents=[2])
    for n in FSHAPES:
        assert torch.allclose(a.directions()[n], b.directions()[n], atol=1e-5)
    U, V = a.dec["0"].U[2], a.dec["0"].V[2]  # each factor pair balanced: equal norms
    assert torch.allclose(U.norm(dim=1), V.norm(dim=1), atol=1e-5)


def test_sae_folders_saved_before_the_per_tensor_modules_still_load():
    """tests/data/sae_v1_*: saved by the ShardSAE of parameter dicts (keys ``dec.0_U``, ``b_pre.0``), with its
    directions and outputs on fixed inputs; loaded today, the same numbers."""
    from pathlib import Path

    from safetensors.torch import load_file

    from shardlib.sae import dense
    from shardlib.updates import Factored

    data = Path(__file__).parent / "data"
    want = load_file(str(data / "sae_v1_expected.safetensors"))
    x = {"w": want["x.w"], "b": want["x.b"]}
    xf = {"w": Factored(want["xf.left"], want["xf.right"]), "b": want["x.b"]}
    for name, inp in (("sae_v1_lowrank", xf), ("sae_v1_dense", x)):
        sae = ShardSAE.load(data / name).eval()
        # the same directions and codes up to float rounding: the dense directions are normalised by a norm whose
        # reduction, like the BLAS kernels, differs between CPUs in the last bit (seen: 6e-8 on another Xeon)
        for n, d in sae.directions().items():
            torch.testing.assert_close(
                d, want[f"{name}.dir.{n}"], rtol=1e-6, atol=1e-7, msg=lambda m, key=f"{name} {n}": f"{key}: {m}"
            )
        with torch.no_grad():
            out = sae(inp)
        torch.testing.assert_close(out.codes, want[f"{name}.codes"], rtol=1e-5, atol=1e-6)
        for n in ("w", "b"):
            assert torch.allclose(dense(out.xhat[n]), want[f"{name}.xhat.{n}"], atol=1e-6), (name, n)
    assert float(sae.threshold) == pytest.approx(0.05) and float(sae.scale) == 1.5


def test_build_trainer_builds_the_configured_sae_from_the_data():
    from shardlib.sae import SAEConfig
    from shardlib.trainer import build_trainer, total_variance
    from shardlib.updates import Factored

    g = torch.Generator().manual_seed(0)
    fact = {"w": Factored(torch.randn(32, 2, 6, generator=g), torch.randn(32, 2, 5, generator=g))}
    cfg = TrainConfig(SAEConfig(n_latents=5, k=2, rank=2, signed=True), lr=0.01, seed=3)
    tr = build_trainer(cfg, fact, total_steps=7)
    assert tr.sae.config()["b_pre_rank"] == 2  # -1: the SAE's rank, as the matrix comes factored
    assert tr.total_steps == 7 and tr.aux_k == 2 and tr.resample and tr.fire_frac == 0.1
    ref = ShardSAE({"w": (6, 5)}, 5, 2, rank=2, signed=True, seed=3, b_pre_rank=2)
    init_from_data(ref, fact)
    for a, b in zip(tr.sae.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert tr.variance == total_variance(fact, float(ref.scale))
    dense_data = {"w": fact["w"].dense()}
    assert build_trainer(cfg, dense_data).sae.config()["b_pre_rank"] == 0  # dense data: a dense b_pre
    # the total variance from the data's moments: E||x/s - mean/s||^2 over tensors, dense or factored
    mixed = {"w": dense_data["w"] + 3.0, "b": torch.randn(32, 4, generator=g, dtype=torch.float64).float()}
    want = sum(float(((v.double() - v.double().mean(0)) ** 2).sum()) for v in mixed.values()) / 32 / 1.5**2
    assert total_variance(mixed, 1.5) == pytest.approx(want, rel=1e-10)
    assert total_variance(fact, 1.5) == pytest.approx(total_variance(dense_data, 1.5), rel=1e-6)
    with pytest.raises(ValueError, match="k=6"):
        SAEConfig(n_latents=5, k=6)


def test_a_factored_batch_on_which_no_latent_fires_has_its_whole_norm_as_error():
    from shardlib.sae import sae_loss, sq_norms

    x = factored_batch()
    sae = perturbed_sae(2, signed=False, encoder_bias=True)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # every score negative: ReLU-TopK keeps nothing
    out = sae_loss(sae, x, variance=1.0, dead=torch.zeros(9, dtype=torch.bool), aux_k=2, aux_coef=0.5)
    assert not out.codes.any()
    y = sae.center(x)
    assert rel_close(out.sq_err, sum(sq_norms(v).double() for v in y.values()))


def test_recon_terms_from_a_kept_gram_matrix_equal_per_batch_ones():
    """An evaluation keeps the decoder's Gram matrices between batches (``grams``): a batch using every latent
    fills it, a later one with a few latents indexes it; the terms are those of each batch's own Gram matrix."""
    sae = perturbed_sae(2, True)
    x = factored_batch(n=8)
    grams = {}
    from shardlib.shards import take

    for sel in ([0, 1, 2, 3, 4, 5, 6, 7], [2], [5, 6]):
        b = {n: take(v, sel) for n, v in x.items()}
        z, want = sae.recon_terms(b)
        z2, got = sae.recon_terms(b, grams)
        assert torch.equal(z, z2)
        for n in want:
            for g, w in zip(got[n], want[n]):
                assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    assert grams and all("K" in g for g in grams.values())  # the first batch used at least half the latents


def test_large_dense_parts_take_blocked_products_with_the_same_loss_and_gradients(monkeypatch):
    """A dense part of at least ``BLOCKED`` numbers computes its products and row norms by custom autograd
    functions (weight gradients written in column blocks, row norms without a gathered copy); forced on for this
    small SAE, the loss and every gradient equal autograd's, AuxK over dead latents included."""
    from shardlib import sae_parts
    from shardlib.sae import sae_loss

    x = densified(factored_batch(n=7))
    grads = []
    for blocked in (1 << 60, 0):
        monkeypatch.setattr(sae_parts, "BLOCKED", blocked)
        monkeypatch.setattr(sae_parts._add_outer, "__defaults__", (4,))  # several blocks of the 120 columns
        sae = perturbed_sae(0, True)
        dead = torch.zeros(9, dtype=torch.bool)
        dead[[1, 4, 7]] = True
        out = sae_loss(sae, x, 2.0, dead, 2, 0.5)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, rtol=1e-6)
    assert g0.keys() == g1.keys() and any(".W" in n for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


def test_trainer_steps_keep_and_zero_the_gradients_blocked_parts_write(monkeypatch):
    """The trainer zeroes (not frees) the gradients that large dense parts add into in place: three steps give the
    SAE that autograd's returned gradients give."""
    from shardlib import sae_parts

    x = densified(factored_batch(n=8))
    states = []
    for blocked in (1 << 60, 0):
        monkeypatch.setattr(sae_parts, "BLOCKED", blocked)
        sae = perturbed_sae(0, True)
        tr = Trainer(sae, TrainConfig(resample_dead=False, fire_frac=0.0, lr=0.01), 2.0, None, 3)
        ptrs = []
        for _ in range(3):
            tr.step(x)
            ptrs.append({n: p.grad.data_ptr() for n, p in sae.named_parameters() if n.endswith(".W")})
        states.append({n: p.detach().clone() for n, p in sae.state_dict().items()})
        if blocked == 0:  # the same gradient tensors every step
            assert ptrs[0] == ptrs[1] == ptrs[2] and len(ptrs[0]) == 6
    for n in states[0]:
        assert torch.allclose(states[0][n], states[1][n], rtol=1e-5, atol=1e-6), n


def test_centred_factored_batches_give_the_loss_and_gradients_of_concatenated_ones(monkeypatch):
    """Factored matrices of at least ``CENTERED`` numbers are centred as :class:`Centered` batches (b_pre's factors
    read once); forced on for this SAE's small matrices, the loss, AuxK included, and every gradient are the same."""
    from shardlib import sae_parts
    from shardlib.sae import sae_loss

    x = factored_batch(n=7)
    out = []
    for centred in (1 << 60, 0):
        monkeypatch.setattr(sae_parts, "CENTERED", centred)
        sae = perturbed_sae(2, True)
        assert isinstance(sae.center(x)["w"], sae_parts.Centered) == (centred == 0)
        dead = torch.zeros(9, dtype=torch.bool)
        dead[[0, 5]] = True
        loss = sae_loss(sae, x, 2.0, dead, 2, 0.5).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-5) and g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
