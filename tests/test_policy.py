import json

import pytest
import torch

from shardlib import policy as pol
from shardlib.tasks import SyntheticTasks


def test_mlp_roundtrip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = pol.MLPPolicy(5, 3, 7)
    pol.save_policy(m, tmp_path / "p")
    assert (tmp_path / "p" / "model.safetensors").exists()
    assert json.loads((tmp_path / "p" / pol.MLP_CONFIG).read_text())["kind"] == "mlp"
    m2 = pol.load_policy(tmp_path / "p")
    x = torch.randn(4, 5)
    assert torch.equal(m(x), m2(x))


def test_any_causal_lm_checkpoint_loads_and_samples(tmp_path):
    """A tiny transformers config saved locally (GPT-2 here) replaces the tiny Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tasks = SyntheticTasks(("max",), n_digits=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "gpt2"
    )
    m = pol.load_policy(tmp_path / "gpt2")
    pol.check_vocab(m, tasks)
    b = tasks.sample(3, torch.Generator().manual_seed(0))
    comp, mask = pol.sample(
        m, b["prompt"], tasks.max_new_tokens, torch.Generator().manual_seed(1), vocab_size=tasks.vocab_size
    )
    assert comp.shape == (3, tasks.max_new_tokens) and comp.max() < tasks.vocab_size
    logp, ent = pol.logprobs(m, b["prompt"], comp, tasks.vocab_size)
    assert logp.shape == comp.shape and (logp <= 0).all() and (ent >= 0).all()


def test_small_vocab_is_rejected(tmp_path):
    m = pol.tiny_lm(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_ff=8)
    with pytest.raises(ValueError, match="vocab_size=8"):
        pol.check_vocab(m, SyntheticTasks())


def test_missing_policy_folder_has_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no policy"):
        pol.load_policy(tmp_path)


def test_lm_logprobs_match_a_manual_computation():
    torch.manual_seed(0)
    m = pol.tiny_lm(vocab_size=12, d_model=8, n_layers=1, n_heads=2, d_ff=8)
    prompt = torch.tensor([[1, 4, 5]])
    comp = torch.tensor([[6, 2]])
    logp, _ = pol.logprobs(m, prompt, comp)
    full = torch.log_softmax(m(input_ids=torch.cat([prompt, comp], 1)).logits, -1)
    assert torch.allclose(logp[0], torch.stack([full[0, 2, 6], full[0, 3, 2]]), atol=1e-6)


def test_logprobs_at_a_temperature_divide_the_logits():
    from shardlib import policy as pol

    torch.manual_seed(0)
    m = pol.MLPPolicy(4, 3, 8)
    x, a = torch.randn(5, 4), torch.randint(3, (5, 1))
    lp2, _ = pol.logprobs(m, x, a, temperature=2.0)
    ref = torch.log_softmax(m(x).float() / 2.0, -1).gather(-1, a)
    assert torch.allclose(lp2, ref) and not torch.allclose(lp2, pol.logprobs(m, x, a)[0])
