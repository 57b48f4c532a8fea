import numpy as np
import xarray as xr

from shardlib.sae import ShardSAE
from shardlib.shardfile import activations_dataset, dense_codes, shard_directions, shards_dataset


def test_shards_file_holds_unit_directions_and_factors():
    sae = ShardSAE({"w": (4, 3), "b": (4,)}, n_latents=5, k=2, rank=1, seed=0)
    ds = shards_dataset(sae, frequency=np.arange(5) / 10)
    dirs = shard_directions(ds)
    assert set(dirs) == {"w", "b"} and dirs["w"].shape == (5, 4, 3)
    norms = np.sqrt(sum((v.reshape(5, -1) ** 2).sum(1) for v in dirs.values()))
    assert np.allclose(norms, 1, atol=1e-6)  # unit over all tensors together
    U, V = ds["w__U"].values, ds["w__V"].values
    w_part = np.einsum("for,fir->foi", U, V)
    assert np.allclose(w_part, dirs["w"], atol=1e-6)  # the factors give the dense direction
    assert ds["frequency"].values.tolist() == (np.arange(5) / 10).tolist()


def test_a_shards_file_over_the_dense_limit_holds_factors_that_give_the_same_directions():
    """Past ``dense_max_bytes`` only the low-rank matrices' factors are written (tagged); the reader forms the same
    unit directions from them, and dense tensors (a bias) stay dense."""
    sae = ShardSAE({"w": (4, 3), "b": (4,)}, n_latents=5, k=2, rank=1, seed=0)
    dense, small = shards_dataset(sae), shards_dataset(sae, dense_max_bytes=5 * 4 * 12 - 1)
    assert "w" not in small and "b" in small and small["w__U"].attrs == {"param": "w", "factor": "U"}
    for n, d in shard_directions(dense).items():
        assert np.allclose(shard_directions(small)[n], d, atol=1e-6)
    assert "w" in shards_dataset(sae, dense_max_bytes=5 * 4 * 12)  # at the limit: dense


def test_activations_file_and_dense_codes():
    store = xr.Dataset(coords={"step": ("event", [0, 0, 1]), "task": ("event", [2, 0, 1])}, attrs={"task_names": "[]"})
    idx = np.array([[1, -1], [0, 2], [-1, -1]])
    val = np.array([[0.5, 0.0], [-2.0, 1.0], [0.0, 0.0]])
    acts = activations_dataset(idx, val, np.array([2]), store)
    assert acts["split"].values.tolist() == ["train", "train", "heldout"]
    assert acts["task"].values.tolist() == [2, 0, 1] and acts.attrs["task_names"] == "[]"
    dense = dense_codes(acts, 3).values
    assert np.array_equal(dense, [[0, 0.5, 0], [2.0, 0, 1.0], [0, 0, 0]])  # |activation|, -1 = empty slot
