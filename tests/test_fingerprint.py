from pathlib import Path

from shardlib.fingerprint import library_digest, library_files

ROOT = Path(__file__).resolve().parent.parent


def test_a_stage_hashes_only_the_library_code_its_notebook_reaches():
    names = lambda nb: {f.name for f in library_files(ROOT / "notebooks" / nb)}
    rl_code, toy_code, fig_code = names("02_rl.ipynb"), names("08_toy_models.ipynb"), names("09_figures.ipynb")
    assert {
        "rl.py",
        "collector.py",
        "shards.py",
        "sae.py",
    } <= rl_code and "toy.py" not in rl_code  # a toy edit keeps RL runs
    assert {
        "toy.py",
        "fit.py",
        "common.py",
    } <= toy_code and "rl.py" not in toy_code  # toy -> fit -> common (make_accelerator), found inside functions
    assert {"figures.py", "fig_toy_models.py", "toy.py"} <= fig_code  # figure scripts and what they import
    assert library_digest(ROOT / "notebooks" / "02_rl.ipynb") != library_digest(
        ROOT / "notebooks" / "08_toy_models.ipynb"
    )


def test_the_stages_that_read_no_store_do_not_hash_the_store_or_the_collector():
    """sae.py and metrics.py import only factored.py, and the planted control and the toy models fit through
    fit.py, not the store-reading shards.py: editing the collector, the ring buffer, the store or the
    re-exporting updates.py keeps the planted and toy-model runs."""
    for nb in ("04_planted.ipynb", "08_toy_models.ipynb"):
        code = {f.name for f in library_files(ROOT / "notebooks" / nb)}
        assert {"factored.py", "fit.py"} <= code, nb
        assert not code & {"collector.py", "ring.py", "updates.py", "store.py", "shards.py"}, nb
