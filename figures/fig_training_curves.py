"""Figure: reward by task family over RL steps (bandit GRPO, LM GRPO, LM SFT control)."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.io import load_results

NAME = "training_curves"
INPUTS = ["rl_bandit/results.nc", "rl_lm/results.nc", "sft_lm/results.nc"]


def make(run_dir):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=False)
    for ax, f, title in zip(axes, INPUTS, ["bandit: GRPO", "LM: GRPO", "LM: SFT control"]):
        plotting.reward_by_task(load_results(run_dir / f), ax, title=title)
    fig.suptitle("Reward by task family during fine-tuning (moving average over 10 steps)")
    return fig
