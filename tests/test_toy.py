import numpy as np
import pytest
import torch

from shardlib import toy, toy_models


def test_set_directions_starts_the_sae_at_the_truth():
    m = toy_models.TMS(5, 2)
    truth = toy_models.circuits(m)
    from shardlib.sae import ShardSAE

    sae = ShardSAE({"W": (2, 5), "b": (5,)}, 5, 1, rank=1, signed=True)
    sae.set_directions_({k: v.clone() for k, v in truth.items()})
    d = sae.directions()
    unit = truth["W"] / truth["W"].flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(d["W"], unit, atol=1e-6) and torch.allclose(d["b"], torch.zeros(5, 5))
    with pytest.raises(ValueError, match="shape"):
        sae.set_directions_({"W": torch.zeros(4, 2, 5), "b": torch.zeros(4, 5)})


def test_params_reject_an_unknown_case_and_a_too_large_k(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        toy.ToyParams.from_dict(dict(out_dir=str(tmp_path), cases=["tms_5_3"]))
    with pytest.raises(ValueError, match="k"):
        toy.ToyParams.from_dict(dict(out_dir=str(tmp_path), cases=["tms_5_2"], k=6))


def test_cases_run_and_the_numbers_do_not_depend_on_workers(tmp_path):
    kw = dict(cases=["tms_5_2", "tmcs"], seeds=[0], model_steps=200, n_samples=512, sae_steps=30)
    serial = toy.run(toy.ToyParams.from_dict(dict(out_dir=str(tmp_path / "a"), workers=1, **kw)), progress=False)
    pooled = toy.run(toy.ToyParams.from_dict(dict(out_dir=str(tmp_path / "b"), workers=2, **kw)), progress=False)
    for k in serial.data_vars:
        assert np.array_equal(serial[k].values, pooled[k].values, equal_nan=True), k
    tms, tmcs = serial.sel(case="tms_5_2"), serial.sel(case="tmcs")
    assert ((tms.mmcs_columnwise >= 0) & (tms.mmcs_columnwise <= 1)).all() and (serial.recon_error >= 0).all()
    assert np.isnan(tms.coef_r).all() and np.isfinite(tmcs.coef_r).all()
    for control in ("mmcs_truth_init", "mmcs_single_feature", "recon_error_single_feature"):  # signed only
        assert (
            np.isfinite(serial[control].sel(activation="signed")).all()
            and np.isnan(serial[control].sel(activation="relu")).all()
        )
    assert "published_tmcs_recon_error_l3d" in serial.attrs
    assert serial.intervention_tms_5_2.shape == (5, 13, 5) and np.isfinite(tms.own_output_share).all()
    assert np.isnan(tmcs.own_output_share).all() and np.isfinite(tms.own_output_share_truth).all()
    assert (serial.ml2r_gradient > 0).all()
    # after run, run_case resumes the finished SAEs: the table's numbers, no retraining
    m, _ = toy.run_case(
        "tmcs", 0, "signed", toy.ToyParams.from_dict(dict(out_dir=str(tmp_path / "b"), workers=2, **kw))
    )
    assert m["mmcs_columnwise"] == serial.mmcs_columnwise.sel(case="tmcs", activation="signed", seed=0).item()
