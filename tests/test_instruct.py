"""The model stage (shardlib.instruct) on a tiny GGUF model, and the text testbed's reward, padding and
GRPO step with factored collection on it."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from shardlib import policy as pol
from shardlib.instruct import InstructParams, question, run
from shardlib.tasks import TEXT_TASKS, TextTasks, parse_answer


def test_parse_answer():
    assert parse_answer("To add 7 and 5: 7 + 5 = 12.") == 12
    assert parse_answer("The answer is -3") == -3
    assert parse_answer("no number here") is None
    assert parse_answer("To add 0 + 6, we need to consider") is None  # the echo's 6 is not an answer
    assert parse_answer("10 - 5 = 5") == parse_answer("10-5=5") == 5 and parse_answer("5 - 10 = -5") == -5
    assert parse_answer("4 + 3 is 7") == 7
    assert parse_answer("7 + 5 = 12.0") == parse_answer("The answer is 12.0.") == 12  # a decimal names its value
    assert parse_answer("The answer is 7.5") == 7.5 and parse_answer("2 \u2212 5 = \u22123") == -3  # Unicode minus
    assert parse_answer("The larger number is 95.0", "only") == 95 and parse_answer("95.5 or 95", "only") is None
    # choosing among the question's numbers: only a completion naming one number answers
    assert parse_answer("The larger number is 95.", "only") == parse_answer("95", "only") == 95
    assert parse_answer("89 is larger than 95.", "only") is None  # its last integer would have scored
    assert parse_answer("95, since 95 > 89", "only") is None and parse_answer("no number", "only") is None
    with pytest.raises(ValueError, match="'first'"):
        parse_answer("12", "first")


@pytest.fixture(scope="module")
def testbed(tiny_instruct_dir):
    return TextTasks(AutoTokenizer.from_pretrained(tiny_instruct_dir), ("add1", "sub", "larger"), 0.2, 6)


def test_prompts_are_left_padded_chat_renderings(testbed):
    batch = testbed.sample(6, torch.Generator().manual_seed(0))
    ids, mask = batch["prompt"], batch["prompt_mask"]
    assert ids.shape == mask.shape and mask[:, -1].all()  # every prompt ends where its completion starts
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max()  # different lengths in one batch: padding is exercised
    for i in range(6):
        n = int(lengths[i])
        assert not mask[i, : ids.shape[1] - n].any()
        text = testbed.tokenizer.decode(ids[i, -n:].tolist())
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
        task = testbed.task_names[int(batch["task"][i])]
        q = question(text)
        assert q.endswith("Answer with the number only."), q
        if task == "add1":  # the answer is the question's own arithmetic
            a, b = (int(x) for x in q.split("?")[0].replace("What is", "").split("+"))
            assert int(batch["answer"][i]) == a + b


def _completion(testbed, texts):
    ids = [testbed.tokenizer(t, add_special_tokens=False)["input_ids"] + [testbed.eos_id] for t in texts]
    width = max(map(len, ids))
    comp = torch.full((len(ids), width), testbed.eos_id)
    for i, x in enumerate(ids):
        comp[i, : len(x)] = torch.tensor(x)
    return comp, (torch.cumsum((comp == testbed.eos_id).int(), 1) - (comp == testbed.eos_id).int()) == 0


def test_held_out_questions_are_never_trained_on(testbed):
    """Evaluation asks a fixed fifth of each family's questions and training the rest: one-digit addition has only
    100 questions, which independent draws for training and evaluation would share."""
    from shardlib.policy import held_out_sample
    from shardlib.tasks import is_held_out

    def questions(batch):
        return {question(testbed.decode(p[m].tolist())) for p, m in zip(batch["prompt"], batch["prompt_mask"])}

    train = questions(testbed.sample(300, torch.Generator().manual_seed(0)))
    held = questions(held_out_sample(testbed, 300, torch.Generator().manual_seed(0)))
    assert train and held and not train & held
    assert all(is_held_out(q) for q in held) and not any(is_held_out(q) for q in train)
    every_add1 = {f"What is {a} + {b}? Answer with the number only." for a in range(10) for b in range(10)}
    assert 10 <= sum(map(is_held_out, every_add1)) <= 30  # about a fifth of the 100
    # testbeds without a held-out split (synthetic tokens, the bandit) draw evaluation prompts as training does
    from shardlib.instruct import samples
    from shardlib.tasks import SyntheticTasks

    synthetic = SyntheticTasks()
    a, b = (
        held_out_sample(synthetic, 4, torch.Generator().manual_seed(1)),
        synthetic.sample(4, torch.Generator().manual_seed(1)),
    )
    assert torch.equal(a["prompt"], b["prompt"])
    model = pol.tiny_lm(synthetic.vocab_size, 16, 1, 2, 32, max_len=32)
    assert len(samples(model, synthetic, 3, seed=0, temperature=1.0)["completion"]) == 3


def test_a_family_on_one_side_of_the_split_is_an_error_not_a_hang(testbed, monkeypatch):
    import shardlib.tasks as tasks

    monkeypatch.setattr(tasks, "is_held_out", lambda question: False)  # no held-out question anywhere
    testbed.sample(3, torch.Generator().manual_seed(0))  # training questions: found
    with pytest.raises(ValueError, match="0 of 3 held-out questions found in 1000 draws each"):
        testbed.sample(3, torch.Generator().manual_seed(0), held_out=True)


def test_rewards_parse_each_tasks_answer_and_the_bare_format(testbed):
    batch = {"task": torch.tensor([0, 0, 1, 2, 2, 2]), "answer": torch.tensor([12, 12, 4, 71, 71, 71])}
    texts = ["12", "The answer is 12.", "5", "71 is larger than 20", "20 is larger than 71.", "The larger is 71."]
    comp, mask = _completion(testbed, texts)
    r = testbed.rewards(batch, comp, mask)
    assert r["correct_add1"].tolist() == [1, 1, 0, 0, 0, 0]
    assert r["correct_sub"].tolist() == [0] * 6  # a wrong answer on sub's prompt
    # larger: only a completion that names the one right number scores; naming both never does, whatever order
    assert r["correct_larger"].tolist() == [0, 0, 0, 0, 0, 1]
    assert r["format"].tolist() == pytest.approx([0.2, 0, 0.2, 0, 0, 0])
    # the answer's form is measured whatever the clause pays: with no format bonus, the reward is the correct share
    assert testbed.bare_answers(comp, mask).tolist() == [1, 0, 1, 0, 0, 0]
    plain = TextTasks(testbed.tokenizer, testbed.task_names, format_bonus=0.0)
    assert plain.rewards(batch, comp, mask)["format"].tolist() == [0] * 6


def test_sft_targets_are_the_bare_answers(testbed):
    batch = testbed.sample(5, torch.Generator().manual_seed(1))
    target, mask = testbed.sft_targets(batch)
    texts = testbed.texts(target, mask)
    assert [int(t) for t in texts] == batch["answer"].tolist()
    assert all(testbed.rewards(batch, target, mask)["format"] > 0)


def test_bad_text_testbeds_are_refused(tiny_instruct_dir):
    tok = AutoTokenizer.from_pretrained(tiny_instruct_dir)
    with pytest.raises(ValueError, match="unknown text task"):
        TextTasks(tok, ("add1", "poetry"))
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        TextTasks(tok, ("add1",))


def test_padded_logprobs_equal_unpadded(testbed, tiny_instruct_dir):
    model = pol.load_policy(tiny_instruct_dir).eval()
    batch = testbed.sample(4, torch.Generator().manual_seed(2))
    comp, mask = pol.sample_batch(model, testbed, batch, torch.Generator().manual_seed(3), 1.0)
    assert comp.shape == (4, testbed.max_new_tokens) and mask[:, 0].all()
    lp, _ = pol.logprobs(model, batch["prompt"], comp, None, 0.7, batch["prompt_mask"])
    for i in range(4):
        n = int(batch["prompt_mask"][i].sum())
        one, _ = pol.logprobs(model, batch["prompt"][i : i + 1, -n:], comp[i : i + 1], None, 0.7)
        torch.testing.assert_close(lp[i], one[0], atol=1e-4, rtol=1e-4)
    again, _ = pol.sample_batch(model, testbed, batch, torch.Generator().manual_seed(3), 1.0)
    assert torch.equal(comp, again)  # seeded sampling is deterministic


def test_prompts_share_their_prefix_and_repeats_once_with_unchanged_logits(testbed, tiny_instruct_dir):
    """The sampler's prompt pass: the common prefix goes forward once (one row), each distinct prompt's remainder
    once, and the logits and cache it spreads back to the repeated rows are those of the plain left-padded pass."""
    import inspect

    model = pol.load_policy(tiny_instruct_dir).eval()
    batch = testbed.sample(3, torch.Generator().manual_seed(4))
    prompt, attn = batch["prompt"].repeat_interleave(2, 0), batch["prompt_mask"].long().repeat_interleave(2, 0)
    P = pol._common_prefix(prompt, attn)
    first = prompt[0, -int(attn[0].sum()) :]
    assert P > 0 and testbed.decode(first[:P].tolist()).startswith("<|im_start|>")  # the chat template's opening
    shapes = []
    model.model.embed_tokens.register_forward_pre_hook(lambda _, a: shapes.append(tuple(a[0].shape)))
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        logits, past, full, pos = pol._encode_prompts(model, prompt, attn, key)
        assert shapes == [(1, P), (3, prompt.shape[1] - P)]  # the prefix once, each distinct remainder once
        plain = model(input_ids=prompt, attention_mask=attn, position_ids=pol._positions(attn), logits_to_keep=1)
        torch.testing.assert_close(logits, plain.logits, atol=1e-5, rtol=1e-5)
        nxt = plain.logits[:, -1].argmax(-1, keepdim=True)  # one more token through the spread cache
        step = model(
            input_ids=nxt,
            attention_mask=torch.cat([full, torch.ones_like(nxt)], 1),
            position_ids=pos + 1,
            **{key: past},
        )
        seq, mask = torch.cat([prompt, nxt], 1), torch.cat([attn, torch.ones_like(nxt)], 1)
        whole = model(input_ids=seq, attention_mask=mask, position_ids=pol._positions(mask), logits_to_keep=1)
        torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_logprobs_with_shared_prompts_have_the_plain_values_and_gradients(testbed, tiny_instruct_dir):
    """GRPO's training pass with each prompt's shared tokens run once (``share_prompts``): the log-probabilities,
    entropies and every parameter's gradient of the plain left-padded pass, with fewer tokens through the model."""
    model = pol.load_policy(tiny_instruct_dir).train()
    batch = testbed.sample(3, torch.Generator().manual_seed(5))
    rep = {k: v.repeat_interleave(4, 0) for k, v in batch.items()}
    comp, _ = pol.sample_batch(model, testbed, rep, torch.Generator().manual_seed(6), 1.0)
    tokens, grads = [], []
    model.model.embed_tokens.register_forward_pre_hook(lambda _, a: tokens.append(a[0].numel()))
    for share in (False, True):
        tokens.clear()
        model.zero_grad()
        lp, ent = pol.logprobs(model, rep["prompt"], comp, None, 0.7, rep["prompt_mask"], share_prompts=share)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, lp.detach(), ent.detach(), sum(tokens)))
    (g0, lp0, ent0, n0), (g1, lp1, ent1, n1) = grads
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)
    assert n1 < n0 / 2  # 3 prompts x 4 completions: each prompt's tokens went through once


def test_evaluations_under_several_draws_encode_the_prompts_once_with_the_same_numbers(testbed, tiny_instruct_dir):
    model = pol.load_policy(tiny_instruct_dir).eval()
    seeds = [None, 1, 2]
    alone = [pol.evaluate(model, testbed, 6, 0, 0.7, sample_seed=s) for s in seeds]
    tokens = []
    model.model.embed_tokens.register_forward_pre_hook(lambda _, a: tokens.append(a[0].shape[1]))
    together = pol.evaluate_seeds(model, testbed, 6, 0, seeds, 0.7)
    assert together == alone
    prompt_passes = sum(n > 1 for n in tokens)  # the prefix and the prompts' own tokens; sampling feeds 1 token
    assert prompt_passes == 2, tokens


def test_model_stage_measures_every_family(tmp_path, tiny_instruct_dir):
    from tiny_gguf import tiny_gguf_path

    p = InstructParams(
        out_dir=str(tmp_path / "model"),
        model=str(tiny_gguf_path(tmp_path)),
        eval_prompts=10,
        max_new_tokens=3,
        n_samples=3,
    )
    ds = run(p)
    assert list(ds.task.values) == list(TEXT_TASKS)
    seen = ds.n > 0  # a family no held-out prompt drew has no accuracy (NaN)
    assert ds.n.sum() == 10 and ((ds.accuracy >= 0) & (ds.accuracy <= 1)).where(seen, True).all()
    assert np.isnan(ds.accuracy.where(~seen)).all()
    assert ds.sizes["sample"] == 3 and all(isinstance(s, str) for s in ds.sample_completion.values)
    assert (tmp_path / "model" / "policy" / "config.json").exists()
    assert json.loads((tmp_path / "model" / "policy" / "shardlib_source.json").read_text())["n_params"] > 0
    from shardlib.findings import finding

    assert "families inside the 15%-85% band" in finding("model", ds)


def test_grpo_step_on_text_collects_factored_events_with_text(tmp_path, tiny_instruct_dir):
    from shardlib.rl import RLParams
    from shardlib.rl import run as rl_run
    from shardlib.updates import open_store

    p = RLParams(
        out_dir=str(tmp_path / "rl"),
        testbed="text",
        init_path=tiny_instruct_dir,
        tasks=["add1", "sub"],
        steps=2,
        prompts_per_step=2,
        group_size=4,
        lr=1e-3,
        max_new_tokens=4,
        eval_prompts=4,
        device="cpu",
        collect_params=["model.layers.*.mlp.*_proj.weight"],
        collect_factored=True,
        collect_max_rank=2,
        loss_type="dr_grpo",
        checkpoint_every=2,
    )
    res = rl_run(p, progress=False)
    ev = open_store(tmp_path / "rl" / "updates" / "events")
    assert ev.sizes["event"] == 2 * 2 * 4  # steps x prompts x completions
    assert {"prompt_text", "completion_text"} <= set(ev.coords)
    assert all(isinstance(t, str) and "Answer with the number only." in t for t in ev.prompt_text.values)
    kept = [c for c in ev.coords if str(c).endswith("__kept")]
    assert len(kept) == 6 and all(((ev[c] > 0) & (ev[c] <= 1 + 1e-6)).all() for c in kept)
    assert res.results.sizes["task"] == 2
    ds = res.results  # the same held-out questions, answered before and after
    assert ds.sizes["sample"] == 8 and all(isinstance(t, str) for t in ds.sample_completion_final.values)
    assert set(ds.sample_task.values) <= {"add1", "sub"}
    for when in ("init", "final"):  # the share of bare-number answers among a family's held-out prompts
        bare, asked = ds[f"eval_bare_{when}"].values, ds.eval_n.values > 0
        assert (np.isnan(bare) == ~asked).all() and ((bare[asked] >= 0) & (bare[asked] <= 1)).all()
    assert (tmp_path / "rl" / "policy" / "tokenizer.json").exists()  # the policy keeps its tokenizer
    steps = np.unique(ev.step.values)
    assert steps.tolist() == [0, 1]


def test_grpo_on_text_collecting_only_step_updates_stores_them_factored(tmp_path, tiny_instruct_dir):
    """collect_events false, collect_step_rank 2: no event store; one factored step update per step, its kept
    share recorded per matrix (the steps share their prompts' tokens: no event needs its own rows)."""
    from shardlib.factored import factor_pairs
    from shardlib.rl import RLParams
    from shardlib.rl import run as rl_run
    from shardlib.updates import open_store

    p = RLParams.from_dict(
        {
            "out_dir": str(tmp_path / "rl"),
            "testbed": "text",
            "init_path": tiny_instruct_dir,
            "tasks": ["add1", "sub"],
            "steps": 2,
            "prompts_per_step": 2,
            "group_size": 4,
            "lr": 1e-3,
            "max_new_tokens": 4,
            "eval_prompts": 4,
            "device": "cpu",
            "collect_params": ["model.layers.*.mlp.*_proj.weight"],
            "collect_events": False,
            "collect_step_rank": 2,
            "checkpoint_every": 2,
        }
    )
    rl_run(p, progress=False)
    assert not (tmp_path / "rl" / "updates" / "events").exists()
    st = open_store(tmp_path / "rl" / "updates" / "steps")
    assert st.sizes["event"] == 2 and len(factor_pairs(st)) == 6
    kept = [c for c in st.coords if str(c).endswith("__kept")]
    assert len(kept) == 6 and all(((st[c] > 0) & (st[c] <= 1)).all() for c in kept)
    with pytest.raises(ValueError, match="collect_step_rank.*none are collected"):
        RLParams.from_dict({**p.to_dict(), "collect_steps": False})


def test_text_testbed_parameters_are_checked_before_compute():
    from shardlib.rl import RLParams

    with pytest.raises(ValueError, match="parameter .tasks.: got"):
        RLParams.from_dict({"out_dir": "x", "testbed": "text", "init_path": "p", "tasks": ["add1", "rev"]})
    with pytest.raises(ValueError, match="init_path"):
        RLParams.from_dict({"out_dir": "x", "testbed": "text", "tasks": ["add1"]})


def test_a_family_without_reward_stops_grpo_before_training(tmp_path, tiny_instruct_dir):
    from shardlib.rl import RLParams, train

    p = RLParams.from_dict(
        {
            "out_dir": str(tmp_path / "rl"),
            "testbed": "text",
            "init_path": tiny_instruct_dir,
            "tasks": ["add2"],
            "steps": 1,
            "prompts_per_step": 1,
            "group_size": 2,
            "max_new_tokens": 2,
            "eval_prompts": 16,
            "device": "cpu",
        }
    )  # a random tiny model never answers a two-digit sum in two tokens
    with pytest.raises(ValueError, match=r"no reward on add2 \(0 of 16\)"):
        train(p, progress=False)
    assert not (tmp_path / "rl" / "checkpoint").exists()


@pytest.mark.parametrize("name", ["smollm.yaml", "gpu_smollm.yaml"])
def test_the_real_model_configs_plan_and_validate(name, tmp_path):
    from pathlib import Path

    from shardlib import runner
    from shardlib.runconfig import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / name)
    stages = runner.plan(cfg, tmp_path)
    runner.validate(stages)  # every stage's parameters against its notebook's Params class
    rl = next(s for s in stages if s.name == "rl_text")
    assert rl.params["testbed"] == "text" and rl.params["init_path"].endswith("model/policy")
