"""The RL stage's parameters (``notebooks/02_rl.ipynb``; :mod:`shardlib.rl` runs them), the online SAE's among
them (``online_*``: :meth:`RLParams.online_train_config`)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import SEED_MAX, Params, param
from .sae import SAEConfig
from .store import MAX_STORE_STEP
from .tasks import TASKS, TEXT_TASKS, check_task_names
from .trainer import TrainConfig


@dataclass(frozen=True)
class RLParams(Params):
    """Parameters of the RL fine-tuning stage (``notebooks/02_rl.ipynb``)."""

    testbed: str = param(
        "bandit",
        "which testbed: the contextual bandit, the synthetic-task LM, or text tasks for a real instruct model",
        choices=("bandit", "lm", "text"),
    )
    algorithm: str = param("grpo", "GRPO fine-tuning, or the SFT control on the same prompts", choices=("grpo", "sft"))
    init_path: str = param(
        "", "starting policy folder (LM: required, the pretrain stage's policy); '' = fresh bandit MLP"
    )
    steps: int = param(60, "rollout steps (each makes inner_epochs optimizer steps)", ge=1)
    prompts_per_step: int = param(32, "prompts (bandit: contexts) per step and process", ge=1)
    group_size: int = param(8, "GRPO: completions per prompt (G)", ge=2)
    inner_epochs: int = param(1, "GRPO: optimizer steps per rollout batch (1 = REINFORCE with a group baseline)", ge=1)
    lr: float = param(1e-3, "Adam learning rate", gt=0)
    clip_eps: float = param(0.2, "GRPO: surrogate clipping epsilon", gt=0)
    kl_beta: float = param(0.0, "weight of the KL to the starting policy (k3 estimator)", ge=0)
    scale_rewards: bool = param(True, "divide group advantages by the group's std (False: Dr. GRPO's advantages)")
    loss_type: str = param(
        "bnpo",
        "loss aggregation (TRL's names): grpo = mean of per-completion token means; bnpo = micro-batch token mean; "
        "dr_grpo = sum / (completions x max_new_tokens); dapo = sum / tokens of the step's rollout",
        choices=("grpo", "bnpo", "dr_grpo", "dapo"),
    )
    temperature: float = param(1.0, "sampling temperature", gt=0)
    grad_accum: int = param(1, "micro-batches per optimizer step (gradient accumulation)", ge=1)
    mixed_precision: str = param("no", "Accelerate mixed precision", choices=("no", "bf16", "fp16"))
    device: str = param("auto", "'cpu', 'cuda' or 'auto' (a GPU when present)", choices=("auto", "cpu", "cuda"))
    checkpoint_every: int = param(20, "rollout steps between checkpoints (resume point after a kill)", ge=1)
    eval_prompts: int = param(256, "held-out prompts for the before/after evaluation", ge=1)
    # bandit
    n_clusters: int = param(4, "bandit: context clusters (event types)", ge=1)
    n_arms: int = param(4, "bandit: arms", ge=2)
    context_dim: int = param(8, "bandit: context dimension", ge=1)
    context_noise: float = param(0.3, "bandit: std of context noise around the cluster centre", ge=0)
    shared_arms: bool = param(False, "bandit: clusters share arms (arm = cluster mod n_arms)")
    rare_cluster_prob: float = param(0.0, "bandit: probability of the last cluster (0 = uniform)", ge=0, lt=1)
    negative_rewards: bool = param(False, "bandit: -1 for a wrong arm")
    hidden: int = param(32, "bandit: MLP hidden width", ge=1)
    env_seed: int = param(0, "bandit: seed of the cluster centres (fixed across RL seeds)", ge=0, le=SEED_MAX)
    n_heads: int = param(
        1,
        "bandit: action heads (> 1: compositional, one context, arm and reward clause per head, so every event "
        "reinforces one computation per head)",
        ge=1,
        le=8,
    )
    shared_trunk: bool = param(
        False,
        "bandit, n_heads > 1: one hidden layer for every head (a head's update then depends on every head's "
        "context) instead of one MLP per head on its own context",
    )
    # lm
    tasks: list[str] = param(
        ["max", "rev", "sort", "par"],
        "LM: task families (must match the pretrained policy's); text: families of shardlib.tasks.TEXT_TASKS",
    )
    n_digits: int = param(4, "LM: digits per prompt (must match the pretrained policy's)", ge=1, le=12)
    format_bonus: float = param(0.1, "LM, text: reward clause for a well-formed completion", ge=0)
    max_new_tokens: int = param(12, "text: tokens sampled per completion", ge=1, le=512)
    require_signal: bool = param(
        True, "text, GRPO: stop before training when a family earns no reward on 16 or more held-out prompts"
    )
    spurious_bonus: float = param(0.0, "LM: reward clause for any completion containing a 7 (0 = off)", ge=0)
    # update collection (issue 3)
    collect_params: list[str] = param([], "glob patterns of parameters whose updates are collected ([] = none)")
    collect_events: bool = param(True, "collect one update per reinforcement event")
    collect_steps: bool = param(True, "collect one update per optimizer step")
    convention: str = param(
        "sgd", "event update scaling: -lr*g ('sgd') or Adam-preconditioned ('adam')", choices=("sgd", "adam")
    )
    store_dtype: str = param("float32", "dtype of stored updates", choices=("float32", "bfloat16", "float16"))
    collect_every: int = param(1, "collect on every k-th optimizer step", ge=1)
    group_events: bool = param(
        False, "store one update per prompt (the sum over its G completions) instead of one per completion"
    )
    collect_factored: bool = param(
        False, "store each event's weight-matrix updates as factors (left, right) instead of dense matrices"
    )
    collect_max_rank: int = param(0, "factored events: at most this many factors per event (0 = exact)", ge=0)
    collect_step_rank: int = param(
        0,
        "step updates: each weight matrix's change stored as the factors of its randomized rank-r SVD, the kept "
        "energy recorded (0 = dense)",
        ge=0,
    )
    buffer_capacity: int = param(0, "ring buffer capacity in events for online SAE training (0 = no buffer)", ge=0)
    # online shards (issue 4)
    online_sae: bool = param(False, "train a shard SAE online from the ring buffer while RL runs")
    online_n_latents: int = param(SAEConfig.n_latents, "online SAE: latents", ge=1)
    online_k: int = param(SAEConfig.k, "online SAE: active latents per event", ge=1)
    online_rank: int = param(SAEConfig.rank, "online SAE: rank per weight matrix (0 = dense)", ge=0)
    online_lr: float = param(TrainConfig.lr, "online SAE: Adam learning rate (relative, as the shard stage's lr)", gt=0)
    online_batch_size: int = param(TrainConfig.batch_size, "online SAE: events per SAE step", ge=1)
    online_steps_per_rl_step: int = param(4, "online SAE: SAE steps after each RL step", ge=1)
    online_warmup: int = param(256, "online SAE: events in the buffer before training starts", ge=1)

    def check(self):
        if self.steps * self.inner_epochs > MAX_STORE_STEP + 1:
            raise ValueError(
                f"parameter 'steps': {self.steps} rollout steps x inner_epochs={self.inner_epochs} make more optimizer "
                f"steps than an update store numbers ({MAX_STORE_STEP + 1:,}); use fewer"
            )
        check_task_names(self.tasks, TEXT_TASKS if self.testbed == "text" else TASKS)
        if self.n_heads > 1 and self.testbed != "bandit":
            raise ValueError(f"parameter 'n_heads': {self.n_heads} heads need the bandit testbed, not {self.testbed!r}")
        if self.testbed in ("lm", "text") and not self.init_path:
            raise ValueError(
                f"parameter 'init_path': the {self.testbed} testbed needs a policy folder (lm: the pretrain stage's "
                "'policy'; text: an instruct model's folder, the model stage's 'policy')"
            )
        if self.online_sae and not (self.buffer_capacity and self.collect_params and self.collect_events):
            raise ValueError(
                "parameter 'online_sae': needs collect_params, collect_events=True and buffer_capacity > 0"
            )
        if self.collect_factored and (self.convention != "sgd" or self.group_events):
            raise ValueError(
                "parameter 'collect_factored': needs convention 'sgd' and group_events false (Adam's elementwise "
                "preconditioner and sums over a prompt's completions are stored dense)"
            )
        if self.collect_step_rank and not (self.collect_steps and self.collect_params):
            raise ValueError(
                f"parameter 'collect_step_rank': {self.collect_step_rank} compresses step updates, but none are "
                "collected; set collect_steps: true and collect_params, or collect_step_rank: 0"
            )
        if self.online_sae and self.online_k > self.online_n_latents:
            raise ValueError(f"parameter 'online_k': {self.online_k} exceeds online_n_latents={self.online_n_latents}")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(
                f"parameter 'grad_accum': {self.grad_accum} must divide prompts_per_step={self.prompts_per_step}"
            )

    def online_train_config(self) -> TrainConfig:
        """The online SAE's config: the ``online_*`` parameters and ``seed``; the shard stage's defaults otherwise."""
        arch = SAEConfig(n_latents=self.online_n_latents, k=self.online_k, rank=self.online_rank)
        return TrainConfig(arch, batch_size=self.online_batch_size, lr=self.online_lr, seed=self.seed)
