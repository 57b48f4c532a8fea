"""The stage kinds: the one registry that :mod:`shardlib.launch`, :mod:`shardlib.findings` and
:mod:`shardlib.report` read.

A kind is what a stage computes, whatever a config names its folder: ``rl_bandit``, ``rl_lm``, ``sft_lm``
(configs/default.yaml) and ``rl_text`` (configs/smollm.yaml) are all of kind ``rl``. Each kind has a stage
module whose ``run(params)`` its notebook and ``python -m shardlib.launch <kind>`` call, the ``Params``
class that validates its parameters, its notebook in ``notebooks/``, and a Finding
(``findings.<kind>``). A run folder's stages are told apart by their ``Params`` class (the executed
``notebook.ipynb`` a stage folder keeps, or the parameters its ``results.nc`` records), never by
folder name: :func:`shardlib.runs.run_stages`.

``run()`` returns the stage's results Dataset for most kinds; ``rl`` returns an ``RLResult``, ``shards`` a
``ShardRun`` and ``figures`` a ``FiguresRun`` (objects that also hold what a notebook goes on to plot: the
policy, the trained SAE, the figures).

Kept free of imports (every notebook imports :mod:`shardlib.findings`, which reads it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str  # the kind: launch's stage argument and the key of its Finding
    module: str  # shardlib.<module> holds run() and the Params class
    params: str  # the Params class
    notebook: str  # its notebook in notebooks/
    progress: bool = False  # run() takes progress= (launch turns the progress bars off)
    # what the notebook's parameters cell shows after out_dir and seed (() = every parameter): the stage's defining
    # parameters. The notebook takes every parameter of its Params class all the same (Params.from_namespace reads
    # the names papermill injects); the validation cell below shows the values in force.
    shown: tuple[str, ...] = ()


# in the order a report lists them
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("model", "instruct", "InstructParams", "00_model.ipynb", shown=("model", "tasks", "eval_prompts")),
        Kind(
            "pretrain",
            "pretrain",
            "PretrainParams",
            "01_pretrain.ipynb",
            progress=True,
            shown=("tasks", "d_model", "n_layers", "steps"),
        ),
        Kind(
            "rl",
            "rl",
            "RLParams",
            "02_rl.ipynb",
            progress=True,
            shown=("testbed", "algorithm", "init_path", "steps", "collect_params", "online_sae"),
        ),
        Kind(
            "shards",
            "shards",
            "ShardParams",
            "03_shards.ipynb",
            progress=True,
            shown=("store_path", "n_latents", "k", "rank"),
        ),
        Kind("frontier", "frontier", "FrontierParams", "06_frontier.ipynb"),
        Kind(
            "planted",
            "planted",
            "PlantedParams",
            "04_planted.ipynb",
            progress=True,
            shown=("n_shards", "n_events", "n_latents", "k", "ranks"),
        ),
        Kind("sparsity", "sparsity", "SparsityParams", "05_sparsity.ipynb"),
        Kind(
            "analysis",
            "analysis",
            "AnalysisParams",
            "07_shard_analysis.ipynb",
            progress=True,
            shown=("shards_dir", "rl_dir", "event_type_label"),
        ),
        Kind(
            "compositional",
            "compositional",
            "CompositionalParams",
            "10_compositional.ipynb",
            shown=("store_path", "sae_seeds", "n_latents", "k", "rank"),
        ),
        Kind("toy", "toy", "ToyParams", "08_toy_models.ipynb", progress=True, shown=("cases", "seeds", "k")),
        Kind("figures", "figures", "FiguresParams", "09_figures.ipynb"),
    )
}


def kind_of(module: str, params: str) -> str | None:
    """The kind whose Params class is ``params`` of ``module`` (``shardlib.rl`` or ``rl``), or None."""
    module = module.removeprefix("shardlib.")
    return next((k.name for k in KINDS.values() if (k.module, k.params) == (module, params)), None)


def module(kind: str):
    """The stage module of a kind (``shardlib.<module>``, imported)."""
    import importlib

    return importlib.import_module(f"shardlib.{KINDS[kind].module}")


def by_notebook(name: str) -> Kind | None:
    """The kind whose notebook is ``name`` (a file name in notebooks/), or None."""
    return next((k for k in KINDS.values() if k.notebook == name), None)


def params_class(kind: str):
    """The Params class of a kind (imports its module)."""
    return getattr(module(kind), KINDS[kind].params)
