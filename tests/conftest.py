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
