"""Figure: held-out FVU against L0 for event and step updates, by SAE rank."""

from shardlib import plotting
from shardlib.io import load_results

NAME = "frontier"
INPUTS = ["frontier/results.nc"]


def make(run_dir):
    return plotting.frontier_panels(load_results(run_dir / INPUTS[0]), "LM {store} updates")
