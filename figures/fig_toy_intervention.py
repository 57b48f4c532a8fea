"""Figure: TMS 5->2 interventions W0 + delta * shard: each shard should move only its own feature's output."""

from shardlib import plotting
from shardlib.io import load_results

NAME = "toy_intervention"
INPUTS = ["toy_models/results.nc"]


def make(run_dir):
    da = load_results(run_dir / INPUTS[0]).intervention_tms_5_2
    return plotting.intervention_curves(da, da.attrs.get("description", ""))
