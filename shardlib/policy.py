"""Policies: a small MLP for the bandit, a causal LM (any ``AutoModelForCausalLM``) for the tasks.

Checkpoints are safetensors plus JSON; loading never executes code from a file.
Both policies share two functions used by the RL loop: :func:`sample` and
:func:`logprobs`, over ``(batch["prompt"], completion)`` pairs.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .common import hf_quiet
from .io import atomic_dir, commit_dir
from .tasks import EOS, SyntheticTasks, completion_mask

MLP_CONFIG = "shardlib_policy.json"


class MLPPolicy(nn.Module):
    """Context vector -> logits over arms (a one-token "completion"): [N, n_actions].

    With ``n_heads`` > 1 (the compositional bandit) it gives one arm's logits per head, [N, n_heads, n_actions]
    (the completion's log-probability is the sum over heads): with ``shared_trunk`` one hidden layer on the whole
    context feeds every head (``net``), else each head is its own MLP on its own slice of the context
    (``heads.<h>``), so that a head's computation lives in its own parameters whatever the other heads see."""

    def __init__(self, context_dim: int, n_actions: int, hidden: int = 32, n_heads: int = 1, shared_trunk: bool = True):
        super().__init__()
        self.config = {"kind": "mlp", "context_dim": context_dim, "n_actions": n_actions, "hidden": hidden}
        if n_heads != 1:  # one-head policies keep the config (and file) they always had
            self.config.update(n_heads=n_heads, shared_trunk=shared_trunk)
        self.n_heads = n_heads
        if n_heads == 1 or shared_trunk:
            self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_heads * n_actions))
            return
        if context_dim % n_heads:
            raise ValueError(f"context_dim={context_dim} does not split into n_heads={n_heads} equal slices")
        d = context_dim // n_heads
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, n_actions)) for _ in range(n_heads)
        )

    def forward(self, x):
        if self.n_heads == 1:
            return self.net(x)
        if hasattr(self, "net"):
            out = self.net(x)
            return out.view(*out.shape[:-1], self.n_heads, -1)
        return torch.stack([m(xh) for m, xh in zip(self.heads, x.chunk(self.n_heads, -1))], -2)


def tiny_lm(
    vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, d_ff: int = 128, max_len: int = 32
):
    """A tiny Llama trained from scratch (transformers architecture, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def is_lm(model) -> bool:
    return not isinstance(unwrap(model), MLPPolicy)


def unwrap(model):
    return getattr(model, "module", model)  # DDP


def save_policy(model, path, extra: dict | None = None, tokenizer=None) -> None:
    """Save weights (safetensors) and JSON config (and ``tokenizer``, when given) atomically into folder ``path``."""
    path = Path(path)
    model = unwrap(model)
    tmp = atomic_dir(path)
    if isinstance(model, MLPPolicy):
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / MLP_CONFIG).write_text(json.dumps(model.config))
    else:
        with hf_quiet():
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    if extra is not None:
        (tmp / "shardlib_extra.json").write_text(json.dumps(extra, sort_keys=True))
    commit_dir(tmp, path)


def load_policy(path, dtype=torch.float32):
    """Load a policy folder written by :func:`save_policy` or any HF causal-LM checkpoint."""
    path = Path(path)
    if (path / MLP_CONFIG).exists():
        cfg = json.loads((path / MLP_CONFIG).read_text())
        cfg.pop("kind")
        model = MLPPolicy(**cfg)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} holds no policy: expected {MLP_CONFIG} (MLP) or config.json (causal LM). "
            "Pass the folder a pretrain or RL stage wrote, or a Hugging Face checkpoint folder."
        )
    from transformers import AutoModelForCausalLM

    with hf_quiet():
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False
        )


def load_extra(path) -> dict:
    p = Path(path) / "shardlib_extra.json"
    return json.loads(p.read_text()) if p.exists() else {}


def check_vocab(model, tasks: SyntheticTasks) -> None:
    n = unwrap(model).config.vocab_size
    if n < tasks.vocab_size:
        raise ValueError(
            f"the causal LM has vocab_size={n} but the synthetic tasks need {tasks.vocab_size} token ids; "
            "use a checkpoint with a larger vocabulary"
        )


# ---------------------------------------------------------------------------
# sampling and log-probabilities, shared by both policies


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _lm_logits(model, prompt, completion, prompt_mask=None):
    """Logits predicting each completion token: [N, L, V]. With ``prompt_mask`` (left-padded prompts of
    different lengths) padding is masked out of attention and positions start at each prompt's first token,
    and only the L positions that predict the completion go through the output layer."""
    ids = torch.cat([prompt, completion], dim=1)
    P = prompt.shape[1]
    if prompt_mask is None:
        out = model(input_ids=ids, use_cache=False)
        return out.logits[:, P - 1 : -1].float()
    attn = torch.cat([prompt_mask.long(), torch.ones_like(completion)], dim=1)
    L = completion.shape[1]
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=_positions(attn), use_cache=False, logits_to_keep=L + 1
    )
    return out.logits[:, :-1].float()


def _lm_logits_shared(model, prompt, completion, prompt_mask):
    """:func:`_lm_logits` of left-padded prompts with what rows share computed once (:func:`_encode_prompts`: the
    chat template's common prefix, and each distinct prompt once however many completions it has), gradients
    included: the shared rows' key/value cache is spread to every row by an index, through which autograd sums
    each row's gradient back. The same logits up to float rounding; a GRPO step of 3 prompts x 8 completions
    then runs the transformer over about a quarter of the tokens. The per-row gradient of a shared position is
    not there to read (a per-event collector needs :func:`_lm_logits`)."""
    key = _cache_key(model)
    first, past, attn, pos = _encode_prompts(model, prompt, prompt_mask.long(), key)
    L = completion.shape[1]
    if L == 1:
        return first.float()
    attn = torch.cat([attn, torch.ones_like(completion)], dim=1)
    pos = pos + torch.arange(1, L + 1, device=pos.device)[None]
    out = model(input_ids=completion, attention_mask=attn, position_ids=pos, use_cache=True, **{key: past})
    return torch.cat([first, out.logits[:, :-1]], dim=1).float()


def logprobs(
    model,
    prompt,
    completion,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    prompt_mask=None,
    share_prompts: bool = False,
):
    """Per-token log pi(completion_t | prompt, completion_<t) and entropy, both [N, L], of the policy
    that samples at ``temperature`` (logits divided by it, as TRL's GRPO does). ``share_prompts`` (left-padded
    prompts of a language model): the prompts' shared tokens go through the model once
    (:func:`_lm_logits_shared`)."""
    if is_lm(model):
        if share_prompts and prompt_mask is not None:
            logits = _lm_logits_shared(model, prompt, completion, prompt_mask)
        else:
            logits = _lm_logits(model, prompt, completion, prompt_mask)
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
    else:
        logits = model(prompt).float()
        logits = logits[:, None, :] if logits.ndim == 2 else logits  # [N, heads, arms]: one token per head
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, completion[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _common_prefix(prompt: torch.Tensor, attn: torch.Tensor) -> int:
    """Length of the token prefix every left-padded row starts with (a chat template's system turn), at most
    each row's length less one: every row keeps a token of its own to predict from."""
    lengths = attn.sum(1)
    width, shortest = prompt.shape[1], int(lengths.min())
    starts = width - lengths
    cols = torch.arange(max(shortest - 1, 0))
    if not len(cols):
        return 0
    aligned = prompt.gather(1, starts[:, None] + cols[None])  # each row's real tokens, from its first
    same = (aligned == aligned[:1]).all(0)
    return int(same.long().cumprod(0).sum())


def _cache_key(model) -> str:
    """The name of the key/value cache (argument and output): ``cache`` in transformers 5.2x, earlier releases
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _encode_prompts(model, prompt, attn, key: str):
    """The prompts' forward pass with the key/value cache, computed once for what rows share: the common prefix
    once (one row), each distinct row's remainder once (GRPO's groups repeat a prompt ``group_size`` times),
    then the cache and last logits spread back to every row. The rows are laid out ``[prefix | padding |
    remainder]`` with the attention mask saying so; positions count real tokens, as for left padding, so
    every row sees what it would alone. Returns the last logits, the cache, the attention mask and the last
    positions, one row per prompt row."""
    n, width = prompt.shape
    rows, inverse = torch.unique(torch.cat([prompt, attn], 1), dim=0, return_inverse=True)
    prompt, attn = rows[:, :width], rows[:, width:]
    P = _common_prefix(prompt, attn)
    own = attn.sum(1) - P  # each row's tokens after the prefix
    rest = int(own.max())
    # the remainders are the last `rest` columns (rows are right-aligned), masked where a row's own part starts later
    remainder = prompt[:, width - rest :]
    mask = (torch.arange(rest, device=prompt.device)[None] >= (rest - own)[:, None]).long()
    cache = {}
    if P:
        first = width - int(attn[0].sum())
        pre = model(input_ids=prompt[:1, first : first + P], use_cache=True, logits_to_keep=1)
        cache = {key: getattr(pre, key)}
        cache[key].reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=prompt.device))
    full = torch.cat([torch.ones_like(attn[:, :P]), mask], 1)
    pos = _positions(full)[:, P:]
    out = model(input_ids=remainder, attention_mask=full, position_ids=pos, use_cache=True, logits_to_keep=1, **cache)
    past = getattr(out, key)
    past.reorder_cache(inverse.to(prompt.device))
    return out.logits[inverse], past, full[inverse], pos[inverse][:, -1:]


@torch.no_grad()
def _sample_cached(
    model, prompt, prompt_mask, max_new_tokens: int, generator, temperature: float, eos_id: int, encoded=None
):
    """Sampling with the key/value cache over left-padded prompts (their shared prefix and repeated rows
    encoded once: :func:`_encode_prompts`); rows that have ended keep emitting ``eos_id`` (masked out of every
    loss by the completion mask). ``encoded``: a dict kept by a caller that samples the same model on the same
    prompts again (:func:`evaluate_seeds`): the prompts' encoding is stored there the first time and a copy of
    it read the next times."""
    key = _cache_key(model)
    if encoded is not None and "prompts" in encoded:
        logits, past, attn, pos = encoded["prompts"]
        past = copy.deepcopy(past)  # sampling appends to the cache in place
    else:
        logits, past, attn, pos = _encode_prompts(model, prompt, prompt_mask.long(), key)
        if encoded is not None:
            encoded["prompts"] = (logits, copy.deepcopy(past), attn, pos)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens = []
    for t in range(max_new_tokens):
        probs = F.softmax(logits[:, -1].float() / temperature, -1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(prompt.device)
        nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
        tokens.append(nxt)
        done |= nxt[:, 0] == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(nxt)], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt, attention_mask=attn, position_ids=pos, use_cache=True, **{key: past})
        logits, past = out.logits, getattr(out, key)
    completion = torch.cat(tokens, dim=1)
    pad = max_new_tokens - completion.shape[1]  # every row ended early: fill to the fixed width
    if pad:
        completion = F.pad(completion, (0, pad), value=eos_id)
    return completion, completion_mask(completion, eos_id)


@torch.no_grad()
def sample(
    model,
    prompt,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    vocab_size=None,
    prompt_mask=None,
    eos_id: int | None = None,
    encoded: dict | None = None,
):
    """Sample completions [N, L] and their mask (tokens up to the first end-of-sequence token).
    ``prompt_mask``: left-padded prompts (real tokenizers), sampled with the key/value cache (``encoded``: see
    :func:`_sample_cached`)."""
    if prompt_mask is not None and is_lm(model):
        return _sample_cached(model, prompt, prompt_mask, max_new_tokens, generator, temperature, eos_id, encoded)
    if not is_lm(model):
        logits = model(prompt).float() / temperature
        if logits.ndim == 3:  # one arm per head
            probs = F.softmax(logits, -1).cpu().reshape(-1, logits.shape[-1])
            act = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2]).to(prompt.device)
        else:
            act = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=generator).to(prompt.device)
        return act, torch.ones_like(act, dtype=torch.bool)
    seq = prompt
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1].float()
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        probs = F.softmax(logits / temperature, -1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(seq.device)
        seq = torch.cat([seq, nxt], dim=1)
    completion = seq[:, prompt.shape[1] :]
    return completion, completion_mask(completion)


@torch.no_grad()
def sample_batch(model, testbed, batch: dict, generator, temperature: float = 1.0, device=None, encoded=None):
    """Completions and masks (on the CPU) for a testbed batch; left-padded prompts (``prompt_mask``) go through
    the key/value-cached sampler (``encoded``: see :func:`_sample_cached`)."""
    pmask = batch.get("prompt_mask")
    comp, mask = sample(
        model,
        batch["prompt"].to(device),
        testbed.max_new_tokens,
        generator,
        temperature,
        getattr(testbed, "vocab_size", None),
        None if pmask is None else pmask.to(device),
        getattr(testbed, "eos_id", EOS),
        encoded,
    )
    return comp.cpu(), mask.cpu()


def held_out_sample(testbed, n: int, generator: torch.Generator) -> dict:
    """``n`` evaluation prompts: the testbed's held-out questions where it keeps them apart from training's (text
    tasks), otherwise prompts drawn as training draws them (the bandit's contexts, the synthetic tasks' digit
    strings: an evaluation prompt may be one that pretraining or RL also drew)."""
    if "held_out" in inspect.signature(testbed.sample).parameters:
        return testbed.sample(n, generator, held_out=True)
    return testbed.sample(n, generator)


@torch.no_grad()
def evaluate(
    model, testbed, n_prompts: int, seed: int, temperature: float = 1.0, device="cpu", sample_seed: int | None = None
) -> dict:
    """Mean reward and per-clause reward by task family on a fixed held-out prompt set (fixed by ``seed``), and
    for text tasks the share of bare-number answers (``bare``); ``sample_seed`` draws the completions with another
    seed on the same prompts (the evaluation's noise)."""
    return evaluate_seeds(model, testbed, n_prompts, seed, [sample_seed], temperature, device)[0]


@torch.no_grad()
def evaluate_seeds(
    model, testbed, n_prompts: int, seed: int, sample_seeds: list, temperature: float = 1.0, device="cpu"
) -> list[dict]:
    """:func:`evaluate` under each of ``sample_seeds`` (None: the evaluation's own draw), the same numbers as one
    call each; left-padded prompts are encoded once for all of them (the shard analysis evaluates the unchanged
    policy under five draws: its noise floor)."""
    encoded = {}
    return [_evaluate(model, testbed, n_prompts, seed, temperature, device, s, encoded) for s in sample_seeds]


def _evaluate(model, testbed, n_prompts, seed, temperature, device, sample_seed, encoded) -> dict:
    gen = torch.Generator().manual_seed(10_000_019 + seed)
    batch = held_out_sample(testbed, n_prompts, gen)
    if sample_seed is not None:
        gen = torch.Generator().manual_seed(20_000_003 + sample_seed)
    comp, mask = sample_batch(model, testbed, batch, gen, temperature, device, encoded)
    clauses = testbed.rewards(batch, comp, mask)
    sel = [batch["task"] == k for k in range(len(testbed.task_names))]

    def by_task(v: torch.Tensor) -> list[float]:  # the mean over each family's prompts (NaN where it has none)
        return [float(v[s].mean()) if s.any() else float("nan") for s in sel]

    out = {"reward": by_task(sum(clauses.values())), "n": [int(s.sum()) for s in sel]}
    out["clauses"] = {c: by_task(v) for c, v in clauses.items()}
    if hasattr(testbed, "bare_answers"):  # text tasks: the share of bare-number answers, whatever the reward pays
        out["bare"] = by_task(testbed.bare_answers(comp, mask))
    return out
