"""shardlib.store: the update store written by hand and by UpdateStore, opened, checked and refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from shardlib.factored import Factored, densify
from shardlib.store import StoreError, UpdateStore, open_store, open_update_stores, update_norms


def _write(ds, path):
    ds.to_netcdf(path)
    return path


def good_store():
    ds = xr.Dataset(
        {"w": (("event", "w_dim0", "w_dim1"), np.random.default_rng(0).normal(size=(5, 3, 2)).astype("float32"))},
        coords={"step": ("event", np.arange(5)), "task": ("event", np.array([0, 1, 0, 1, 0]))},
        attrs={"kind": "event", "convention": "sgd"},
    )
    ds["w"].attrs["param"] = "layer.weight"
    return ds


def test_store_written_by_hand_roundtrips(tmp_path):
    ds = good_store()
    out = open_store(_write(ds, tmp_path / "mine.nc"))
    assert np.array_equal(out["w"].values, ds["w"].values)
    df = update_norms(out)
    assert np.allclose(df["norm"], np.sqrt((ds["w"].values ** 2).sum((1, 2))))


def test_lazy_open_for_large_stores(tmp_path):
    out = open_store(_write(good_store(), tmp_path / "s.nc"), lazy_above_bytes=0)
    assert hasattr(out["w"].data, "chunks")


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda ds: ds.assign(w=ds["w"].assign_attrs(param=None).drop_attrs()), "no parameter variable"),
        (
            lambda ds: ds.assign(w=ds["w"].transpose("w_dim0", "event", "w_dim1")),
            "'w' has dims .* the first must be 'event'",
        ),
        (lambda ds: ds.assign(w=ds["w"].where(ds.step != 2, np.nan)), "'w' holds NaN or Inf"),
        (
            lambda ds: ds.assign_coords(reward=("label", np.arange(4.0))),
            "label 'reward' has dims \\('label',\\) \\(4 values\\) but the store has 5 events",
        ),
        (lambda ds: ds.drop_attrs(deep=False), "attribute 'kind'"),
    ],
)
def test_malformed_stores_are_rejected_naming_the_problem(tmp_path, breakage, message):
    bad = breakage(good_store())
    with pytest.raises(StoreError, match=message):
        open_store(_write(bad, tmp_path / "bad.nc"))


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")


def test_crash_mid_write_leaves_a_readable_store(tmp_path):
    s = UpdateStore(tmp_path / "st", "event", "sgd", "f")
    s.append({"w": torch.ones(2, 3)}, {"step": np.array([0, 0])}, 0)
    s.flush()
    s.append({"w": torch.ones(2, 3)}, {"step": np.array([1, 1])}, 1)

    class Boom(Exception):
        pass

    def explode(self, ds, first, last):  # the process dies while writing the second chunk
        from shardlib.io import atomic_write

        def half(tmp):
            Path(tmp).write_bytes(b"CDF\x01 half a file")
            raise Boom

        atomic_write(self.path / f"chunk-{first:08d}-{last:08d}.nc", half)

    orig = UpdateStore._write
    UpdateStore._write = explode
    try:
        with pytest.raises(Boom):
            s.flush()
    finally:
        UpdateStore._write = orig
    (tmp_path / "st" / "chunk-00000001-00000001.nc.x.tmp").write_bytes(b"garbage")  # a tmp file a SIGKILL left
    ds = open_store(tmp_path / "st")
    assert ds.sizes["event"] == 2 and ds["step"].values.tolist() == [0, 0]


def test_truncate_drops_events_from_resume_point(tmp_path):
    s = UpdateStore(tmp_path / "st", "event", "sgd", "f")
    for step in range(4):
        s.append({"w": torch.full((2, 1), float(step))}, {"step": np.array([step, step])}, step)
    s.flush()  # one chunk covering steps 0..3
    s.truncate_from(2)
    ds = open_store(tmp_path / "st")
    assert ds["step"].values.tolist() == [0, 0, 1, 1]


def test_another_runs_store_is_never_overwritten(tmp_path):
    UpdateStore(tmp_path / "st", "event", "sgd", "run-a")
    with pytest.raises(StoreError, match="another run"):
        UpdateStore(tmp_path / "st", "event", "sgd", "run-b")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        UpdateStore(tmp_path / "other", "event", "sgd", "run-a")


def test_open_update_stores_makes_a_runs_event_and_step_stores(tmp_path):
    pair = dict(convention="adam", fingerprint="run-a", config={"lr": 0.1}, seed=3, attrs={"testbed": "bandit"})
    events, steps = open_update_stores(tmp_path / "updates", events=True, steps=True, **pair)
    assert (events.path, events.kind, events.convention) == (tmp_path / "updates" / "events", "event", "adam")
    assert (steps.path, steps.kind, steps.convention) == (tmp_path / "updates" / "steps", "step", "step")
    events.append({"w": torch.ones(2, 3)}, {"step": np.array([0, 0])}, 0)
    steps.append({"w": torch.ones(1, 3)}, {"step": np.array([0])}, 0)
    events.flush(), steps.flush()
    for kind, n in (("events", 2), ("steps", 1)):
        ds = open_store(tmp_path / "updates" / kind)
        assert ds.sizes["event"] == n and ds.attrs["fingerprint"] == "run-a" and ds.attrs["testbed"] == "bandit"
        assert json.loads(ds.attrs["config"]) == {"lr": 0.1} and ds.attrs["seed"] == 3
    assert open_update_stores(tmp_path / "updates", events=False, steps=False, **pair) == (None, None)
    events, steps = open_update_stores(tmp_path / "only", events=False, steps=True, **pair)
    assert events is None and steps.kind == "step" and not (tmp_path / "only" / "events").exists()
    with pytest.raises(StoreError, match="another run"):  # reopened: the stores keep their run
        open_update_stores(tmp_path / "updates", events=True, steps=True, **{**pair, "fingerprint": "run-b"})


def three_chunk_store(path, fingerprint="run-a", scale=1.0):
    """Steps 0-8, 4 events a step, one chunk per 3 steps (as an RL stage writes it)."""
    s = UpdateStore(path, "event", "sgd", fingerprint)
    for step in range(9):
        s.append({"w": torch.full((4, 2, 3), scale * (step + 1))}, {"step": np.full(4, step)}, step)
        if step % 3 == 2:
            s.flush()
    return path


def test_a_store_refuses_gaps_foreign_copied_and_changed_chunks(tmp_path):
    import shutil

    good = three_chunk_store(tmp_path / "good")
    assert open_store(good)["step"].values.tolist() == np.repeat(np.arange(9), 4).tolist()
    names = [f.name for f in sorted(good.glob("chunk-*.nc"))]
    assert names == ["chunk-00000000-00000002.nc", "chunk-00000003-00000005.nc", "chunk-00000006-00000008.nc"]
    other = three_chunk_store(tmp_path / "other", fingerprint="run-b", scale=-1.0)  # another seed's run

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return d

    gap = broken("gap", lambda d: (d / names[1]).unlink())  # the deleted middle chunk
    with pytest.raises(
        StoreError, match=r"chunk-00000003-00000005.nc \(steps 3-5, 12 events\) is missing: the store has a gap"
    ):
        open_store(gap)
    appended = broken("appended", lambda d: shutil.copy(other / names[2], d / "chunk-00000009-00000011.nc"))
    with pytest.raises(StoreError, match="chunk-00000009-00000011.nc is not part of this store"):
        open_store(appended)
    copied = broken("copied", lambda d: shutil.copy(d / names[0], d / "chunk-00000000-00000002 (copy).nc"))
    with pytest.raises(StoreError, match=r"\(copy\).nc is not part of this store"):
        open_store(copied)
    swapped = broken("swapped", lambda d: shutil.copy(other / names[1], d / names[1]))
    with pytest.raises(StoreError, match="chunk-00000003-00000005.nc differs from the chunk the run wrote"):
        open_store(swapped)
    with pytest.raises(StoreError, match="comes from another run"):
        open_store(swapped, verify=False)  # without checksums, the chunk's fingerprint still tells

    def flip_a_byte(d):
        raw = bytearray((d / names[2]).read_bytes())
        raw[-200] ^= 0xFF
        (d / names[2]).write_bytes(bytes(raw))

    with pytest.raises(StoreError, match="chunk-00000006-00000008.nc differs"):
        open_store(broken("bitrot", flip_a_byte))


def test_hand_written_chunk_folders_are_checked_for_overlaps_and_step_labels(tmp_path):
    import shutil

    good = three_chunk_store(tmp_path / "good")
    d = tmp_path / "hand"
    d.mkdir()
    for f in good.glob("chunk-*.nc"):
        shutil.copy(f, d / f.name)
    assert open_store(d).sizes["event"] == 36  # no store.json: accepted, steps checked
    shutil.copy(d / "chunk-00000003-00000005.nc", d / "chunk-00000005-00000006.nc")
    with pytest.raises(StoreError, match="step labels run 3-5, outside the steps 5-6 its name promises"):
        open_store(d)
    (d / "chunk-00000005-00000006.nc").unlink()
    shutil.copy(d / "chunk-00000000-00000002.nc", d / "chunk-00000000-00000003.nc")  # an extra copy of steps 0-2
    with pytest.raises(StoreError, match=r"overlaps chunk-00000000-00000002.nc \(steps 0-2\)"):
        open_store(d)
    (d / "notes.nc").write_bytes(b"")
    with pytest.raises(StoreError, match=r"\['notes.nc'\] are not chunk files"):
        open_store(d)


def test_a_folder_without_store_json_refuses_two_files_holding_the_same_steps(tmp_path):
    import shutil

    good = three_chunk_store(tmp_path / "good")
    d = tmp_path / "plain"  # a store folder by hand: plain file names, no store.json
    d.mkdir()
    for i, f in enumerate(sorted(good.glob("chunk-*.nc"))):
        shutil.copy(f, d / f"part{i}.nc")
    assert open_store(d).sizes["event"] == 36
    shutil.copy(d / "part1.nc", d / "steps_3_to_5.nc")  # the copy under a plain new name: steps 3-5 twice
    with pytest.raises(StoreError, match=r"steps_3_to_5.nc and part1.nc in .* both hold events of step 3"):
        open_store(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda e: e.pop("sha256"), r"lacks or mistypes \['sha256'\]"),
        (lambda e: e.update(events="12"), r"lacks or mistypes \['events'\]"),
        (lambda e: e.clear(), r"lacks or mistypes \['first', 'last', 'events', 'sha256'\]"),
    ],
)
def test_a_store_json_entry_without_its_fields_is_a_store_error(tmp_path, edit, message):
    d = three_chunk_store(tmp_path / "st")
    meta = json.loads((d / "store.json").read_text())
    edit(meta["chunks"]["chunk-00000003-00000005.nc"])
    (d / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"store.json: the entry of chunk 'chunk-00000003-00000005.nc' " + message):
        open_store(d)
    with pytest.raises(StoreError, match=message):  # resuming the store too
        UpdateStore(d, "event", "sgd", "run-a")


def test_a_store_json_without_a_chunk_mapping_is_a_store_error(tmp_path):
    d = three_chunk_store(tmp_path / "st")
    meta = json.loads((d / "store.json").read_text())
    (d / "store.json").write_text(json.dumps({**meta, "chunks": sorted(meta["chunks"])}))  # a list, not a mapping
    with pytest.raises(StoreError, match="holds no chunk list"):
        open_store(d)
    with pytest.raises(StoreError, match="no chunk list"):
        UpdateStore(d, "event", "sgd", "run-a")


def test_resuming_a_store_drops_unlisted_chunks_and_stale_tmp_files(tmp_path):
    d = three_chunk_store(tmp_path / "st")
    (d / "chunk-00000009-00000009.nc.abc.tmp").write_bytes(b"half")  # a kill during a chunk write
    import shutil

    shutil.copy(d / "chunk-00000006-00000008.nc", d / "chunk-00000009-00000011.nc")  # written, not yet listed
    s = UpdateStore(d, "event", "sgd", "run-a")
    assert not list(d.glob("*.tmp"))
    s.truncate_from(7)  # resume at step 7
    assert open_store(d)["step"].values.tolist() == np.repeat(np.arange(7), 4).tolist()
    assert json.loads((d / "store.json").read_text())["chunks"]["chunk-00000006-00000006.nc"]["events"] == 4


def test_a_kill_while_writing_the_first_store_json_does_not_block_the_store(tmp_path):
    d = tmp_path / "st"
    d.mkdir()
    (d / "store.json.abc123.tmp").write_text("{half")  # what the kill left
    s = UpdateStore(d, "event", "sgd", "f")
    s.append({"w": torch.ones(2, 3)}, {"step": np.array([0, 0])}, 0)
    s.flush()
    assert open_store(d).sizes["event"] == 2 and not list(d.glob("*.tmp"))


def test_factored_chunks_with_different_factor_counts_open_as_one_store(tmp_path):

    es = UpdateStore(tmp_path / "ev", "event", "sgd", "f")
    g = torch.Generator().manual_seed(0)
    parts = []
    for step, m in enumerate((2, 5)):
        f = Factored(torch.randn(3, m, 4, generator=g), torch.randn(3, m, 6, generator=g))
        parts.append(f.dense())
        es.append({"w": f}, {"step": np.full(3, step)}, step)
        es.flush()  # one chunk per step
    ds = open_store(tmp_path / "ev")
    assert ds.sizes["w_factor"] == 5 and ds.sizes["event"] == 6
    np.testing.assert_allclose(densify(ds)["w"].values, torch.cat(parts).numpy(), rtol=1e-5, atol=1e-6)


def _factored_ds(L, R, **attrs):
    return xr.Dataset(
        {
            "w__left": (("event", "w_factor", "w_dim0"), L, {"param": attrs.get("pl", "w")}),
            "w__right": (("event", "w_factor", "w_dim1"), R, {"param": attrs.get("pr", "w")}),
        },
        coords={"step": ("event", np.zeros(len(L), int))},
        attrs={"kind": "event", "convention": "sgd"},
    )


def test_malformed_factored_stores_are_rejected_naming_the_problem(tmp_path):
    L, R = np.random.randn(4, 3, 5), np.random.randn(4, 3, 6)
    good = _factored_ds(L, R)
    good.to_netcdf(tmp_path / "good.nc")
    assert open_store(tmp_path / "good.nc").sizes["event"] == 4
    Ln = L.copy()
    Ln[1, 0, 0] = np.nan
    Lp = L.copy()
    Lp[2, 2] = 0  # a padding row on the left only
    cases = {
        "nan": (_factored_ds(Ln, R), "NaN or Inf"),
        "pad": (_factored_ds(Lp, R), "one side only"),
        "param": (_factored_ds(L, R, pr="v"), "same 'param'"),
        "orphan": (_factored_ds(L, R).drop_vars("w__right"), "matching"),
        "shape": (
            _factored_ds(L, R)
            .drop_vars("w__right")
            .assign(w__right=(("event", "other", "w_dim1"), np.random.randn(4, 2, 6), {"param": "w"})),
            "expected",
        ),
        "both": (_factored_ds(L, R).assign(w=(("event", "a", "b"), np.zeros((4, 5, 6)), {"param": "w"})), "both"),
    }
    for name, (ds, msg) in cases.items():
        ds.to_netcdf(tmp_path / f"{name}.nc")
        with pytest.raises(StoreError, match=msg):
            open_store(tmp_path / f"{name}.nc")


def test_factored_store_trains_the_shard_sae_and_reports_norms_like_its_dense_twin(tmp_path):
    from shardlib.sae import dense
    from shardlib.shards import load_updates

    g = torch.Generator().manual_seed(0)
    f = Factored(torch.randn(8, 3, 4, generator=g), torch.randn(8, 3, 6, generator=g))
    es = UpdateStore(tmp_path / "ev", "event", "sgd", "f")
    es.append({"w": f, "b": torch.randn(8, 4, generator=g)}, {"step": np.zeros(8, int)}, 0)
    es.flush()
    ds = open_store(tmp_path / "ev")
    densify(ds).to_netcdf(tmp_path / "twin.nc")
    a, _ = load_updates(tmp_path / "ev")
    b, _ = load_updates(tmp_path / "twin.nc")
    assert isinstance(a["w"], Factored) and not isinstance(b["w"], Factored)  # loaded factored: never densified
    assert set(a) == {"w", "b"} and all(torch.allclose(dense(a[n]), b[n], atol=1e-6) for n in a)
    np.testing.assert_allclose(
        update_norms(ds)["norm"], update_norms(open_store(tmp_path / "twin.nc"))["norm"], rtol=1e-5
    )
