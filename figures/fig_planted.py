"""Figure: planted-shard positive control: recovery by SAE rank (dense = rank 0)."""

from shardlib import plotting
from shardlib.io import load_results

NAME = "planted"
INPUTS = ["planted/results.nc"]


def make(run_dir):
    return plotting.planted_recovery(load_results(run_dir / INPUTS[0]))
