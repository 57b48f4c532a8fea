"""Figure: fraction of parameters unchanged under each lens, RL vs SFT, and against the learning rate."""

from shardlib import plotting
from shardlib.io import load_results

NAME = "sparsity"
INPUTS = ["sparsity/results.nc"]


def make(run_dir):
    return plotting.sparsity_lenses(load_results(run_dir / INPUTS[0]))
