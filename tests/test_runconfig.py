from pathlib import Path

import pytest

from shardlib.runconfig import PipelineError, load_config

ROOT = Path(__file__).resolve().parent.parent


def _alias_bomb(wide: int, deep: int) -> str:
    """The "billion laughs": ``deep`` levels of lists of ``wide`` aliases to the level below."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * wide)}]" for i in range(1, deep + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_bombs_and_duplicate_keys_are_refused_in_one_line(tmp_path, capsys):
    import time

    from shardlib.__main__ import main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(20, 7))
    assert len(bomb.read_bytes()) < 650  # the size of the 639-byte bomb: 20 aliases wide, 7 deep
    t0 = time.perf_counter()
    assert main(["run", "--config", str(bomb), "--runs-dir", str(tmp_path / "runs")]) == 1
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert err.startswith(f"error: config {bomb} (line ") and "more than 100 aliases" in err and err.count("\n") == 1
    doubling = tmp_path / "doubling.yaml"  # few aliases, each doubling: 2**30 values
    doubling.write_text(_alias_bomb(2, 30))
    with pytest.raises(PipelineError, match="expands to more than 100000 values"):
        load_config(doubling)
    (tmp_path / "loop.yaml").write_text("run: x\nstages: &s {a: *s}\n")
    with pytest.raises(PipelineError, match="an alias refers to a value that contains it"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "deep.yaml").write_text("run: x\nstages: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PipelineError, match="nested more than 32 levels deep"):
        load_config(tmp_path / "deep.yaml")
    dup = tmp_path / "dup.yaml"
    dup.write_text(
        "run: x\nseed: 1\nstages:\n  pretrain: {notebook: 01_pretrain.ipynb, params: {steps: 3, steps: 4}}\n"
    )
    with pytest.raises(
        PipelineError, match=rf"{dup} \(line 4, column 62\): duplicate key 'steps' \(first given on line 4\); keep one"
    ):
        load_config(dup)
    assert load_config(ROOT / "configs" / "default.yaml")["stages"]["sft_lm"]["params"]["testbed"] == "lm"  # <<: *lm


def test_a_config_that_is_not_text_is_one_error_line(tmp_path, capsys):
    from shardlib.__main__ import main

    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    assert main(["run", "--config", str(tmp_path / "bin.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: config ") and "is not a UTF-8 text file" in err and err.count("\n") == 1
