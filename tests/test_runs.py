def test_stages_are_found_by_kind_whatever_their_folder_names(tmp_path, stage_folder):
    """A stage's kind comes from its notebook's Params class, or else from the parameters its results record."""
    import xarray as xr

    from shardlib.io import save_results
    from shardlib.report_smollm import is_smollm_run
    from shardlib.runs import run_stages

    stage_folder(tmp_path / "my_grpo", "shardlib.rl", "RLParams", b"")
    stage_folder(tmp_path / "zz_model", "shardlib.instruct", "InstructParams", b"")
    stage_folder(tmp_path / "no_results", "shardlib.rl", "RLParams")  # not run yet: not a stage with results
    (tmp_path / "launched").mkdir()  # run by shardlib.launch: results only
    save_results(xr.Dataset(), tmp_path / "launched" / "results.nc", {"sweep_dirs": ["x"], "sweep_names": ["a"]})
    (tmp_path / "other").mkdir()  # parameters no Params class holds
    save_results(xr.Dataset(), tmp_path / "other" / "results.nc", {"nothing_like_it": 1})
    assert run_stages(tmp_path) == {"zz_model": "model", "my_grpo": "rl", "launched": "frontier"}
    assert is_smollm_run(tmp_path) and not is_smollm_run(tmp_path / "my_grpo")
