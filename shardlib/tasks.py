"""Testbeds with known reinforcement-event types.

Both testbeds expose the same interface to the RL loop (``shardlib.rl``):

- ``sample(n, generator) -> dict`` with ``prompt`` (what the policy conditions on)
  and ``task`` (the event type's family: a task id, or a bandit context cluster); text tasks take
  ``held_out=True`` for the evaluation's questions, disjoint from training's;
- ``rewards(batch, completion, mask) -> dict[clause, Tensor[n]]``: the reward is a
  sum of named clauses, each recorded separately;
- ``sft_targets(batch) -> (completion, mask)``: the correct answer (SFT control);
- ``task_names``, ``clause_names``, ``max_new_tokens``.

Event types must reinforce *different computations* for shards to be recoverable
every bandit cluster rewards its own arm, every LM task needs its
own algorithm (add, reverse, sort, parity, max).
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import torch

# ---------------------------------------------------------------------------
# Contextual bandit ("shard zoo")


class ContextualBandit:
    """K context clusters in R^d, each rewarding one arm.

    A context is a cluster centre (random unit vector, fixed by ``env_seed``) plus
    Gaussian noise. Cluster k's rewarded arm is k, or k mod n_arms when arms are
    shared. Clauses: ``hit`` (+1 for the rewarded arm) and ``miss`` (-1 for any
    other arm when ``negative_rewards``, else 0).

    ``n_heads`` > 1 makes it compositional: the context is the concatenation of one such
    context per head (each head has its own centres; each head's cluster is drawn
    independently), the action is one arm per head (a completion of ``n_heads`` tokens),
    and the reward has one clause per head, ``hit_h<h>`` (and ``miss_h<h>``), from that
    head's own cluster. Every event then reinforces ``n_heads`` computations at once, one
    per head (head, its cluster, its arm taken). ``task`` is the joint cluster
    (``sum_h cluster_h * K**h``, named ``"h0c1 h1c3"``) and ``clusters`` [n, n_heads] holds
    each head's. ``n_heads`` = 1 is the plain bandit, draw for draw.
    """

    def __init__(
        self,
        n_clusters: int = 4,
        n_arms: int = 4,
        context_dim: int = 8,
        noise: float = 0.3,
        shared_arms: bool = False,
        rare_cluster_prob: float = 0.0,
        negative_rewards: bool = False,
        env_seed: int = 0,
        n_heads: int = 1,
    ):
        if not shared_arms and n_arms < n_clusters:
            raise ValueError(
                f"n_arms={n_arms} < n_clusters={n_clusters}: every cluster needs its own arm; "
                "raise n_arms or set shared_arms=True"
            )
        if n_heads < 1:
            raise ValueError(f"n_heads={n_heads}: the action needs at least one head")
        g = torch.Generator().manual_seed(env_seed)
        centres = torch.randn(n_clusters, context_dim, generator=g)
        self.centres = centres / centres.norm(dim=1, keepdim=True)
        self.head_centres = [self.centres]  # head 0's centres are the one-head bandit's; later heads draw on
        for _ in range(1, n_heads):
            c = torch.randn(n_clusters, context_dim, generator=g)
            self.head_centres.append(c / c.norm(dim=1, keepdim=True))
        self.n_heads = n_heads
        self.n_clusters, self.n_arms, self.context_dim = n_clusters, n_arms, context_dim
        self.noise, self.negative_rewards = noise, negative_rewards
        self.best_arm = torch.arange(n_clusters) % n_arms
        probs = torch.full((n_clusters,), 1.0 / n_clusters)
        if rare_cluster_prob > 0:  # the last cluster is rare
            probs[:-1] = (1 - rare_cluster_prob) / (n_clusters - 1)
            probs[-1] = rare_cluster_prob
        self.cluster_probs = probs
        if n_heads == 1:
            self.task_names = [f"cluster{k}" for k in range(n_clusters)]
            self.clause_names = ["hit", "miss"]
        else:
            joint = np.stack(np.unravel_index(np.arange(n_clusters**n_heads), (n_clusters,) * n_heads)[::-1], 1)
            self.task_names = [" ".join(f"h{h}c{c}" for h, c in enumerate(row)) for row in joint]
            self.clause_names = [f"hit_h{h}" for h in range(n_heads)] + [f"miss_h{h}" for h in range(n_heads)]
        self.max_new_tokens = n_heads
        self.n_actions = n_arms

    def sample(self, n: int, generator: torch.Generator) -> dict:
        if self.n_heads == 1:
            task = torch.multinomial(self.cluster_probs, n, replacement=True, generator=generator)
            ctx = self.centres[task] + self.noise * torch.randn(n, self.context_dim, generator=generator)
            return {"prompt": ctx, "task": task}
        clusters = torch.stack(
            [
                torch.multinomial(self.cluster_probs, n, replacement=True, generator=generator)
                for _ in self.head_centres
            ],
            1,
        )
        ctx = torch.cat([c[clusters[:, h]] for h, c in enumerate(self.head_centres)], 1)
        ctx = ctx + self.noise * torch.randn(n, self.n_heads * self.context_dim, generator=generator)
        task = (clusters * self.n_clusters ** torch.arange(self.n_heads)).sum(1)
        return {"prompt": ctx, "task": task, "clusters": clusters}

    def rewards(self, batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict:
        if self.n_heads == 1:
            hit = (completion[:, 0] == self.best_arm[batch["task"]]).float()
            miss = -(1 - hit) if self.negative_rewards else torch.zeros_like(hit)
            return {"hit": hit, "miss": miss}
        hits = (completion[:, : self.n_heads] == self.best_arm[batch["clusters"]]).float()
        out = {f"hit_h{h}": hits[:, h] for h in range(self.n_heads)}
        for h in range(self.n_heads):
            out[f"miss_h{h}"] = -(1 - hits[:, h]) if self.negative_rewards else torch.zeros_like(hits[:, h])
        return out

    def sft_targets(self, batch: dict):
        if self.n_heads == 1:
            target = self.best_arm[batch["task"]][:, None]
        else:
            target = self.best_arm[batch["clusters"]]
        return target, torch.ones_like(target, dtype=torch.bool)


# ---------------------------------------------------------------------------
# Synthetic tasks for a small causal language model

SPECIALS = ["<pad>", "<bos>", "<eos>", "="]
TASKS = {
    # name: function of the digit list -> answer digit list
    "add": lambda d: [(d[0] + d[1]) % 10],  # the first two digits, mod 10
    "rev": lambda d: d[::-1],
    "sort": lambda d: sorted(d),
    "par": lambda d: [sum(x % 2 for x in d) % 2],
    "max": lambda d: [max(d)],
}
PAD, BOS, EOS, EQ = range(4)


class SyntheticTasks:
    """Tagged synthetic tasks: ``<bos> <task> d1 .. dn =`` -> ``answer <eos>``.

    Every prompt has the same length (no padding in prompts). Clauses:
    ``correct_<task>`` (1 when the completion is exactly the answer followed by
    ``<eos>``, on that task's prompts only), ``format`` (``format_bonus`` when the
    completion is digits then ``<eos>``), ``spurious`` (``spurious_bonus`` when the
    completion contains the digit ``spurious_digit``: a reward unrelated to the task).
    """

    def __init__(
        self,
        tasks=("add", "rev", "sort", "par"),
        n_digits: int = 4,
        format_bonus: float = 0.1,
        spurious_bonus: float = 0.0,
        spurious_digit: int = 7,
    ):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown task(s) {unknown}; accepted: {sorted(TASKS)}")
        self.task_names = list(tasks)
        self.vocab = SPECIALS + list(TASKS) + [str(i) for i in range(10)]
        self.tag = {t: self.vocab.index(t) for t in TASKS}
        self.digit0 = self.vocab.index("0")
        self.n_digits = n_digits
        self.format_bonus, self.spurious_bonus, self.spurious_digit = format_bonus, spurious_bonus, spurious_digit
        self.answer_len = {t: len(TASKS[t](list(range(n_digits)))) for t in tasks}
        self.max_new_tokens = max(self.answer_len.values()) + 1
        self.prompt_len = n_digits + 3
        self.clause_names = [f"correct_{t}" for t in tasks] + ["format", "spurious"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def sample(self, n: int, generator: torch.Generator) -> dict:
        task = torch.randint(len(self.task_names), (n,), generator=generator)
        digits = torch.randint(10, (n, self.n_digits), generator=generator)
        tags = torch.tensor([self.tag[t] for t in self.task_names])[task]
        prompt = torch.cat(
            [torch.full((n, 1), BOS), tags[:, None], digits + self.digit0, torch.full((n, 1), EQ)], dim=1
        )
        return {"prompt": prompt, "task": task, "digits": digits}

    def answers(self, batch: dict) -> list[list[int]]:
        """Token ids of each prompt's correct answer, ``<eos>`` included."""
        out = []
        for t, d in zip(batch["task"].tolist(), batch["digits"].tolist()):
            ans = TASKS[self.task_names[t]](d)
            out.append([a + self.digit0 for a in ans] + [EOS])
        return out

    def sft_targets(self, batch: dict, noise: float = 0.0, generator: torch.Generator | None = None):
        """Correct completions, or with probability ``noise`` random digits of the right length."""
        answers = self.answers(batch)
        n, L = len(answers), self.max_new_tokens
        target = torch.full((n, L), PAD)
        mask = torch.zeros((n, L), dtype=torch.bool)
        flip = torch.rand(n, generator=generator) < noise if noise > 0 else torch.zeros(n, dtype=torch.bool)
        rand = torch.randint(10, (n, L), generator=generator) + self.digit0 if noise > 0 else None
        for i, a in enumerate(answers):
            a = torch.tensor(a)
            if flip[i]:
                a[:-1] = rand[i, : len(a) - 1]
            target[i, : len(a)] = a
            mask[i, : len(a)] = True
        return target, mask

    def rewards(self, batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict:
        answers = self.answers(batch)
        n = completion.shape[0]
        out = {c: torch.zeros(n) for c in self.clause_names}
        comp = completion.tolist()
        lengths = mask.sum(1).tolist()
        for i in range(n):
            seq = comp[i][: lengths[i]]
            has_eos = bool(seq) and seq[-1] == EOS
            body = seq[:-1] if has_eos else seq
            task = self.task_names[int(batch["task"][i])]
            if seq == answers[i]:
                out[f"correct_{task}"][i] = 1.0
            if has_eos and all(self.digit0 <= s < self.digit0 + 10 for s in body):
                out["format"][i] = self.format_bonus
            if self.spurious_bonus and (self.digit0 + self.spurious_digit) in body:
                out["spurious"][i] = self.spurious_bonus
        return out

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def event_texts(self, batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-event labels a reader needs to see what was reinforced: the prompt and the completion as text
        (``"<bos> par 3 1 4 1 ="``, ``"1 <eos>"``)."""
        lengths = mask.sum(1).tolist()
        return {
            "prompt_text": np.array([self.decode(p.tolist()) for p in batch["prompt"]], dtype=object),
            "completion_text": np.array(
                [self.decode(c[:n].tolist()) for c, n in zip(completion, lengths)], dtype=object
            ),
        }


def check_task_names(tasks, known=None) -> None:
    """The ``tasks`` parameter of a stage: a non-empty list of distinct names of ``known`` (default ``TASKS``)."""
    known = TASKS if known is None else known
    if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(known):
        raise ValueError(
            f"parameter 'tasks': got {list(tasks)!r}; accepted: a non-empty list of distinct task names from {list(known)}"
        )


def completion_mask(completion: torch.Tensor, eos_id: int = EOS) -> torch.Tensor:
    """Tokens up to and including the first end-of-sequence token (all tokens when there is none)."""
    is_eos = completion == eos_id
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # eos seen strictly before t
    return before == 0


# ---------------------------------------------------------------------------
# Verifiable text tasks for a real instruct model (chat template, real tokenizer)


def _two(g, lo, hi):
    return torch.randint(lo, hi + 1, (2,), generator=g).tolist()


def _larger(g):
    a, b = torch.randperm(90, generator=g)[:2].add(10).tolist()  # two different 2-digit numbers
    return f"Which number is larger, {a} or {b}? Answer with the number only.", max(a, b)


def _max4(g):
    xs = torch.randperm(90, generator=g)[:4].add(10).tolist()
    return f"What is the largest of these numbers: {', '.join(map(str, xs))}? Answer with the number only.", max(xs)


def _add1(g):
    a, b = _two(g, 0, 9)
    return f"What is {a} + {b}? Answer with the number only.", a + b


def _add2(g):
    a, b = _two(g, 10, 99)
    return f"What is {a} + {b}? Answer with the number only.", a + b


def _sub(g):
    a = int(torch.randint(5, 21, (1,), generator=g))
    b = int(torch.randint(0, 6, (1,), generator=g))
    return f"What is {a} - {b}? Answer with the number only.", a - b


# name: (what it asks, a function of a torch.Generator -> (question, integer answer), how the answer is read:
# "last" = the completion's last integer outside a restated operation, "only" = the one integer it names; see
# parse_answer)
TEXT_TASKS = {
    "add1": ("one-digit addition", _add1, "last"),
    "add2": ("two-digit addition", _add2, "last"),
    "sub": ("subtraction, 5-20 minus 0-5", _sub, "last"),
    "larger": ("the larger of two 2-digit numbers", _larger, "only"),
    "max4": ("the largest of four 2-digit numbers", _max4, "only"),
}
_NUMBER = re.compile(r"[-\u2212]?\d+(?:\.\d+)?")  # "12", "-3", "\u22123" (Unicode minus), "12.0", "7.5"
_OPERATION = re.compile(r"\d+\s*[-+\u2212]\s*\d+")  # "7 + 5", "10-5": a restated operation, not an answer
_BARE = re.compile(r"^\s*-?\d+\s*\.?\s*$")


def _bare(texts: list[str]) -> torch.Tensor:
    """1 where a decoded completion is a bare number, else 0."""
    return torch.tensor([float(bool(_BARE.match(t))) for t in texts])


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out fifth of its family's questions (a fixed hash of its text):
    the text testbed trains on the other four fifths and evaluates on this one."""
    return zlib.crc32(question.encode()) % 5 == 0


def _number(s: str) -> int | float:
    v = float(s.replace("\u2212", "-"))
    return int(v) if v.is_integer() else v


def parse_answer(text: str, rule: str = "last") -> int | float | None:
    """The answer a completion gives, or None. ``last``: its last integer outside any restated operation
    ("7 + 5 = 12." -> 12), for arithmetic, where the working names the operands first; an echo of the operation
    names no answer ("To add 0 + 6, we need" -> None, where the last integer would have scored). Only symbolic
    operations are skipped: "To add 0 and 6" still gives 6. ``only``: the one distinct integer it names ("The
    larger number is 95." -> 95), for choosing among the question's numbers: a completion that names several
    candidates ("89 is larger than 95.") gives none, or restating the question would score (the last integer of
    "89 is larger than 95." is the right answer to the wrong claim). A decimal names its value: "12.0" and "12"
    are 12, "7.5" is 7.5 (never an integer answer); a Unicode minus is a minus."""
    if rule not in ("last", "only"):
        raise ValueError(f"answer rule {rule!r}: use 'last' or 'only'")
    if rule == "last":
        text = _OPERATION.sub(" ", text)
    found = [_number(x) for x in _NUMBER.findall(text)]
    if rule == "only":
        return found[0] if found and len(set(found)) == 1 else None
    return found[-1] if found else None


class TextTasks:
    """Verifiable arithmetic questions for a real instruct model, asked through its chat template.

    A prompt is the chat template's rendering of one user question (the template's default system
    prompt included), tokenized and left-padded to the batch's longest prompt, with ``prompt_mask``
    marking real tokens. The answer is read from the decoded completion by the task's rule (:func:`parse_answer`:
    for arithmetic the last integer outside a restated operation, the only integer named for choosing a number).
    Clauses: ``correct_<task>`` (1 when that integer is the answer, on that task's prompts only) and ``format``
    (``format_bonus`` when the completion is the bare number; on SmolLM2 GRPO learnt this clause instead of the
    tasks, and configs/smollm.yaml pays none).
    Each event's prompt and completion text are kept as labels (:meth:`event_texts`).
    """

    def __init__(
        self, tokenizer, tasks=("add1", "sub", "larger", "max4"), format_bonus: float = 0.2, max_new_tokens: int = 12
    ):
        unknown = [t for t in tasks if t not in TEXT_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown text task(s) {unknown}; accepted: {sorted(TEXT_TASKS)}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: use an instruct model's folder as init_path")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token: use an instruct model's tokenizer")
        self.tokenizer = tokenizer
        self.task_names = list(tasks)
        self.format_bonus, self.max_new_tokens = format_bonus, max_new_tokens
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.clause_names = [f"correct_{t}" for t in tasks] + ["format"]
        self.vocab_size = None  # the model's whole vocabulary

    @classmethod
    def from_folder(
        cls, folder, tasks=("add1", "sub", "larger", "max4"), format_bonus: float = 0.2, max_new_tokens: int = 12
    ) -> TextTasks:
        """The text tasks with the tokenizer (and chat template) saved in a model folder."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)), tasks, format_bonus, max_new_tokens)

    def render(self, question: str) -> list[int]:
        """Token ids of one question in the chat template, ending where the assistant's answer begins."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, n: int, generator: torch.Generator, held_out: bool = False) -> dict:
        """``n`` questions, each of a family drawn uniformly. Training questions (``held_out=False``) and held-out
        ones (``held_out=True``: the evaluation's) are disjoint sets (:func:`is_held_out`): one-digit addition has
        only 100 questions, so questions drawn independently for training and evaluation would overlap, and a
        held-out rise could be the training answers remembered."""
        task, qa = [], []
        for _ in range(1000 * n):  # a fifth of the questions are held out: about 5 n draws for n
            if len(qa) == n:
                break
            t = int(torch.randint(len(self.task_names), (1,), generator=generator))
            q, a = TEXT_TASKS[self.task_names[t]][1](generator)
            if is_held_out(q) == held_out:
                task.append(t)
                qa.append((q, a))
        if len(qa) < n:
            raise ValueError(
                f"text tasks {self.task_names}: {len(qa)} of {n} {'held-out' if held_out else 'training'} questions "
                "found in 1000 draws each; a family's questions must fall on both sides of the split (is_held_out)"
            )
        task = torch.tensor(task, dtype=torch.long)
        ids = [self.render(q) for q, _ in qa]
        width = max(len(x) for x in ids)
        prompt = torch.full((n, width), self.pad_id)
        prompt_mask = torch.zeros((n, width), dtype=torch.bool)
        for i, x in enumerate(ids):  # left padding: every prompt ends where the completion starts
            prompt[i, width - len(x) :] = torch.tensor(x)
            prompt_mask[i, width - len(x) :] = True
        return {"prompt": prompt, "prompt_mask": prompt_mask, "task": task, "answer": torch.tensor([a for _, a in qa])}

    def texts(self, completion: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(c[m.bool()].tolist(), skip_special_tokens=True) for c, m in zip(completion, mask)]

    def rewards(self, batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict:
        n = completion.shape[0]
        out = {c: torch.zeros(n) for c in self.clause_names}
        texts = self.texts(completion, mask)
        for i, text in enumerate(texts):
            task = self.task_names[int(batch["task"][i])]
            if parse_answer(text, TEXT_TASKS[task][2]) == int(batch["answer"][i]):
                out[f"correct_{task}"][i] = 1.0
        out["format"] = _bare(texts) * self.format_bonus
        return out

    def bare_answers(self, completion: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """1 where a completion is a bare number ("12", "12."), 0 elsewhere, whatever the format clause pays
        (nothing when ``format_bonus`` is 0): the evaluation reports this share beside the reward."""
        return _bare(self.texts(completion, mask))

    def sft_targets(self, batch: dict):
        """The bare answer followed by the end-of-sequence token."""
        answers = [
            self.tokenizer(str(int(a)), add_special_tokens=False)["input_ids"] + [self.eos_id]
            for a in batch["answer"].tolist()
        ]
        width = max(len(a) for a in answers)
        target = torch.full((len(answers), width), self.pad_id)
        mask = torch.zeros((len(answers), width), dtype=torch.bool)
        for i, a in enumerate(answers):
            target[i, : len(a)], mask[i, : len(a)] = torch.tensor(a), True
        return target, mask

    def event_texts(self, batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-event labels a reader needs to see what was reinforced: the question and the completion."""
        prompts = [
            self.tokenizer.decode(p[m].tolist(), skip_special_tokens=False)
            for p, m in zip(batch["prompt"], batch["prompt_mask"])
        ]
        return {
            "prompt_text": np.array(prompts, dtype=object),
            "completion_text": np.array(self.texts(completion, mask), dtype=object),
        }

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
