"""Helpers every stage uses, below the stage modules: devices, seeds, determinism, flattening."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch


def make_accelerator(device: str, mixed_precision: str = "no", grad_accum: int = 1):
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no GPU is visible; use device='cpu' or 'auto'")
    try:
        return Accelerator(
            cpu=(device == "cpu" or not torch.cuda.is_available()),
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum,
        )
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        raise RuntimeError(
            f"accelerate's process-wide state was set up by other code in this Python process (e.g. a TRL "
            f"trainer) with other settings, and this stage needs device={device!r}, mixed_precision="
            f"{mixed_precision!r}. Run the stage in its own process (its notebook, `python -m shardlib.launch`, "
            "or `python -m shardlib run`), or, when that other code is done, call "
            "`accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)` first"
        ) from e


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A generator per (seed, step, process): a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + step * 7919 + rank * 104_729 + 17)


@contextlib.contextmanager
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` inside the block, the previous setting after.

    On a GPU, deterministic cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` (torch raises without it): it is set
    to ``:4096:8`` unless already set. cuBLAS reads it when a process first uses it, so set it in the
    environment before starting (``scripts/gpu_check.sh`` does) for runs that use the GPU earlier."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def dense_parameter_count(shapes: dict[str, tuple], n_latents: int, encoder_bias: bool = False) -> int:
    """Parameters of the dense (full-rank) SAE of the same size: encoder, decoder, b_pre (and b_enc)."""
    D = sum(math.prod(s) for s in shapes.values())
    return 2 * n_latents * D + n_latents * encoder_bias + D


def flatten(tensors: dict[str, torch.Tensor], names=None) -> np.ndarray:
    """Concatenate per-tensor [F, *shape] into [F, D] (in ``names`` order); a Factored batch is made dense
    (this is the dense view analysis needs: call it on as many rows as fit)."""
    names = names or list(tensors)
    rows = [v.dense() if hasattr(v, "dense") else v for v in (tensors[k] for k in names)]
    return torch.cat([v.reshape(v.shape[0], -1) for v in rows], 1).numpy()


PROGRESS_INTERVAL = 5.0  # seconds between progress-bar refreshes


def progress_bar(iterable=None, **kwargs):
    """A progress bar (``tqdm.auto``: a widget in JupyterLab with ipywidgets, text elsewhere) that refreshes
    at most every ``PROGRESS_INTERVAL`` seconds, so an executed notebook keeps a bounded number of
    progress lines per stage (papermill records every text refresh)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", PROGRESS_INTERVAL)
    return tqdm(iterable, **kwargs)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@contextlib.contextmanager
def hf_quiet():
    """transformers' own progress bars (loading, writing, converting weights) off inside the block: in an executed
    notebook they are left as stale 0% bars. The GGUF loader calls ``tqdm`` directly, past transformers' switch,
    so its module's ``tqdm`` is a disabled one inside the block."""
    import functools
    import importlib

    from transformers.utils import logging as hf_logging

    try:
        gguf = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # the gguf package missing: nothing to silence
        gguf = None
    bar = getattr(gguf, "tqdm", None)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()


def fmt_bytes(n: float | None, digits: int = 1, missing: str = "–") -> str:
    """A size in bytes as B, KiB, MiB or GiB (powers of 1024): whole bytes below 1 KiB, else ``digits`` decimals;
    ``missing`` for None. The project's one byte formatter (report, notebooks, GPU summary, benchmarks)."""
    if n is None:
        return missing
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} GiB"
