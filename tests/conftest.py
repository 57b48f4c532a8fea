import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores; one thread each (and their
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses and notebook kernels), not N threads spinning on N

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


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


# the longest modules first, roughly by time (pytest -n 2 --dist loadfile --no-loadscope-reorder keeps this order): the
# two longest start at once on the two workers, the short ones fill in at the end
SLOW_FIRST = (
    "test_study.py",
    "test_gpu_check.py",
    "test_runner.py",
    "test_integrations_trl.py",
    "test_shards.py",
    "test_rl.py",
    "test_launch.py",
)


def pytest_collection_modifyitems(config, items):
    """Put the longest test modules first, so that under the README's test command (``pytest -n auto --dist
    loadfile --no-loadscope-reorder``) they start early and the short ones fill in around them. Order within a
    module is kept."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(scope="session")
def tiny_instruct_dir(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer and a chat template, written as GGUF and converted by
    shardlib.hub as SmolLM2 is (the text testbed's model in tests)."""
    from tiny_gguf import tiny_gguf_path

    from shardlib.hub import convert_gguf

    tmp = tmp_path_factory.mktemp("instruct")
    return str(convert_gguf(tiny_gguf_path(tmp), tmp / "policy"))


@pytest.fixture
def stage_folder():
    """Makes a stage folder as the runner leaves it: its executed notebook (naming its Params class) and
    results: ``stage_folder(folder, module, params, results=None)``."""
    import json

    def make(folder, module, params, results=None):
        folder.mkdir(parents=True)
        code = f"from {module} import {params}\np = {params}.from_namespace(globals())\n"
        nb = {"cells": [{"cell_type": "code", "source": [code], "metadata": {}}]}
        (folder / "notebook.ipynb").write_text(json.dumps(nb))
        if results is not None:
            (folder / "results.nc").write_bytes(results)

    return make
