import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A briefly pretrained tiny LM policy folder (shared by the RL/updates tests)."""
    from shardlib.pretrain import PretrainParams, train

    out = tmp_path_factory.mktemp("pretrain")
    train(
        PretrainParams(
            out_dir=str(out), steps=5, batch_size=8, d_model=16, d_ff=32, n_heads=2, eval_prompts=8, device="cpu"
        ),
        progress=False,
    )
    return str(out / "policy")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole papermill pipeline on configs/tiny.yaml, once per test session: (run folder, stage records)."""
    from pathlib import Path

    from shardlib import runner

    runs = tmp_path_factory.mktemp("runs")
    records = runner.run(
        runner.load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"), runs_dir=runs
    )
    return runs / "tiny", records
