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


def test_wall_times_give_a_span_only_for_stages_run_in_one_invocation(tmp_path):
    import json

    from shardlib.runs import wall_times

    def record(stage, started, seconds):
        (tmp_path / stage).mkdir(exist_ok=True)
        st = {"stage": stage, "seconds": seconds, "started": started, "finished": started + seconds, "jobs": 2}
        (tmp_path / stage / ".stage.json").write_text(json.dumps(st))

    record("a", 1000.0, 120.0)
    record("b", 1000.0, 60.0)
    record("c", 1061.0, 90.0)  # started when b ended
    text = wall_times(tmp_path)
    assert (
        "they add up to 4.5 min. From the first stage's start to the last one's end: 2.5 min (151 s), 2 stage(s)"
        in text
    )
    assert "(target ≤ 3 min: met)." in wall_times(tmp_path, target_min=3)
    assert "(target ≤ 2 min: NOT met)." in wall_times(tmp_path, target_min=2)
    record("c", 1000.0 + 3600.0, 90.0)  # rerun alone an hour later
    text = wall_times(tmp_path)
    assert "did not all run in one invocation (for 58 min none ran)" in text and "From the first" not in text
