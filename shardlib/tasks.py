"""Testbeds with known reinforcement-event types.

Both testbeds expose the same interface to the RL loop (``shardlib.rl``):

- ``sample(n, generator) -> dict`` with ``prompt`` (what the policy conditions on)
  and ``task`` (the event type's family: a task id, or a bandit context cluster);
- ``rewards(batch, completion, mask) -> dict[clause, Tensor[n]]``: the reward is a
  sum of named clauses, each recorded separately;
- ``sft_targets(batch) -> (completion, mask)``: the correct answer (SFT control);
- ``task_names``, ``clause_names``, ``max_new_tokens``.

Event types must reinforce *different computations* for shards to be recoverable
(field notes §6): every bandit cluster rewards its own arm, every LM task needs its
own algorithm (add, reverse, sort, parity, max).
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------
# Contextual bandit ("shard zoo")


class ContextualBandit:
    """K context clusters in R^d, each rewarding one arm.

    A context is a cluster centre (random unit vector, fixed by ``env_seed``) plus
    Gaussian noise. Cluster k's rewarded arm is k, or k mod n_arms when arms are
    shared. Clauses: ``hit`` (+1 for the rewarded arm) and ``miss`` (-1 for any
    other arm when ``negative_rewards``, else 0).
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
    ):
        if not shared_arms and n_arms < n_clusters:
            raise ValueError(
                f"n_arms={n_arms} < n_clusters={n_clusters}: every cluster needs its own arm; "
                "raise n_arms or set shared_arms=True"
            )
        g = torch.Generator().manual_seed(env_seed)
        centres = torch.randn(n_clusters, context_dim, generator=g)
        self.centres = centres / centres.norm(dim=1, keepdim=True)
        self.n_clusters, self.n_arms, self.context_dim = n_clusters, n_arms, context_dim
        self.noise, self.negative_rewards = noise, negative_rewards
        self.best_arm = torch.arange(n_clusters) % n_arms
        probs = torch.full((n_clusters,), 1.0 / n_clusters)
        if rare_cluster_prob > 0:  # the last cluster is rare
            probs[:-1] = (1 - rare_cluster_prob) / (n_clusters - 1)
            probs[-1] = rare_cluster_prob
        self.cluster_probs = probs
        self.task_names = [f"cluster{k}" for k in range(n_clusters)]
        self.clause_names = ["hit", "miss"]
        self.max_new_tokens = 1
        self.n_actions = n_arms

    def sample(self, n: int, generator: torch.Generator) -> dict:
        task = torch.multinomial(self.cluster_probs, n, replacement=True, generator=generator)
        ctx = self.centres[task] + self.noise * torch.randn(n, self.context_dim, generator=generator)
        return {"prompt": ctx, "task": task}

    def rewards(self, batch: dict, completion: torch.Tensor, mask: torch.Tensor) -> dict:
        hit = (completion[:, 0] == self.best_arm[batch["task"]]).float()
        miss = -(1 - hit) if self.negative_rewards else torch.zeros_like(hit)
        return {"hit": hit, "miss": miss}

    def sft_targets(self, batch: dict):
        target = self.best_arm[batch["task"]][:, None]
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


def check_task_names(tasks) -> None:
    """The ``tasks`` parameter of a stage: a non-empty list of distinct names of ``TASKS`` (a stage's Params check)."""
    if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(TASKS):
        raise ValueError(
            f"parameter 'tasks': got {list(tasks)!r}; accepted: a non-empty list of distinct task names from {list(TASKS)}"
        )


def completion_mask(completion: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including the first ``<eos>`` (all tokens when there is none)."""
    is_eos = completion == EOS
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # eos seen strictly before t
    return before == 0
