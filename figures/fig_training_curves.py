"""Figure: reward by task family over RL steps (bandit GRPO, LM GRPO) and the SFT control's loss."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.io import load_results

NAME = "training_curves"
INPUTS = ["rl_bandit/results.nc", "rl_lm/results.nc", "sft_lm/results.nc"]


def make(run_dir):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=False)
    for ax, f, title in zip(axes[:2], INPUTS, ["bandit: GRPO", "LM: GRPO"]):
        plotting.reward_by_task(load_results(run_dir / f), ax, title=title)
    # SFT trains on the target answers (their reward is constant): its curve is the loss
    sft = load_results(run_dir / INPUTS[2])
    axes[2].plot(sft.step, plotting.smooth(sft.loss, 10))
    axes[2].set(xlabel="step", ylabel="NLL of the targets", title="LM: SFT control, loss (10-step mean)")
    fig.suptitle("Fine-tuning: reward by task family (moving average over 10 steps) and the SFT control's loss")
    fig.tight_layout()
    return fig
