import sys

import numpy as np
import pytest
import torch

from shardlib.common import deterministic, flatten, step_generator


def test_step_generators_repeat_per_seed_step_and_process():
    draw = lambda *a: torch.rand(4, generator=step_generator(*a))
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))  # a resumed run draws what an uninterrupted one would
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(1, 5, 0))


def test_deterministic_restores_the_previous_setting():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_flatten_concatenates_tensors_in_the_given_order():
    t = {"b": torch.arange(6.0).view(2, 3), "a": torch.arange(8.0).view(2, 2, 2)}
    out = flatten(t, ["a", "b"])
    assert out.shape == (2, 7)
    assert np.array_equal(out[1], [4, 5, 6, 7, 3, 4, 5])


def test_progress_bars_refresh_at_most_every_few_seconds():
    import io

    from shardlib.common import PROGRESS_INTERVAL, progress_bar

    out = io.StringIO()
    bar = progress_bar(range(1000), file=out)
    assert bar.mininterval == PROGRESS_INTERVAL >= 1  # papermill records every refresh of a text bar
    assert list(bar) == list(range(1000))
    assert out.getvalue().count("\r") <= 3  # start, end (and no refresh in between: it took < 5 s)


def test_an_accelerator_state_left_by_other_code_gives_a_clear_error():
    """A TRL trainer in the same process leaves accelerate's state in mixed precision; a stage then says what
    to do instead of accelerate's bare 'restart your runtime'."""
    import pytest
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from shardlib.common import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        Accelerator(cpu=True, mixed_precision="bf16")
        with pytest.raises(RuntimeError, match="its own process"):
            make_accelerator("cpu")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert make_accelerator("cpu").mixed_precision == "no"


def test_hf_quiet_silences_the_gguf_loaders_own_progress_bar(capsys):
    gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from shardlib.common import hf_quiet

    bar = gguf.tqdm
    with hf_quiet():
        assert list(gguf.tqdm(range(3), desc="Converting")) == [0, 1, 2]
    assert gguf.tqdm is bar  # restored after the block
    assert "Converting" not in capsys.readouterr().err
    list(gguf.tqdm(range(3), desc="Converting", file=sys.stderr))
    assert "Converting" in capsys.readouterr().err  # the check above can fail
