"""Collecting per-event and per-step parameter updates from any PyTorch loop (:class:`UpdateCollector`),
and the model introspection it needs.

Conventions (``convention`` attribute of every store)
-----------------------------------------------------
A training step minimises ``L = sum_e l_e`` over its reinforcement events ``e``
(the loss's normalisation is folded into each ``l_e``).

- ``sgd``  : event update ``u_e = -lr * grad l_e``. Then ``sum_e u_e = -lr * grad L``,
  the plain-SGD step the events jointly make.
- ``adam`` : ``u_e = -lr * grad l_e / (sqrt(v_hat) + eps)`` with ``v_hat`` the
  optimizer's bias-corrected second moment *after* the step (Adam's preconditioner
  applied to each event; the momentum term is left out: it mixes steps).
- step updates are always ``theta_after - theta_before`` of one optimizer step.

Per-event gradients of ``nn.Linear`` layers come from the RL step's own
forward/backward: a forward hook keeps each layer's input ``x`` and a tensor hook its
output gradient ``delta``; event ``e``'s weight gradient is ``sum_t delta_{e,t} x_{e,t}^T``
(one einsum for all events), never a loop over events.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .factored import Factored, cat_factored, factorize, randomized_rank
from .ring import RingBuffer
from .store import UpdateStore, var_name


def select_params(model: nn.Module, patterns) -> dict[str, nn.Parameter]:
    """Parameters whose names match any glob in ``patterns`` (``*.mlp.*.weight``)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    named = dict(model.named_parameters())
    chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        sample = ", ".join(list(named)[:8])
        raise ValueError(f"no parameter matches {list(patterns)}; parameter names look like: {sample}")
    return chosen


def selection_summary(params: dict[str, torch.Tensor]) -> str:
    total = sum(p.numel() for p in params.values())
    lines = [f"{n}: {tuple(p.shape)}" for n, p in params.items()]
    return "\n".join(
        lines + [f"{len(params)} tensors, {total:,} parameters ({4 * total / 2**10:.1f} KiB per fp32 update)"]
    )


def check_convention(convention: str, factored: bool) -> None:
    """The event-update convention is known, and factored events are plain sgd (what every collector checks
    before it is built)."""
    if convention not in ("sgd", "adam"):
        raise ValueError(f"convention must be 'sgd' or 'adam', got {convention!r}")
    if factored and convention == "adam":
        raise ValueError(
            "factored=True needs convention='sgd': Adam's elementwise preconditioner does not keep an "
            "event update factored (collect factored sgd events, or dense adam events)"
        )


class NotGatheredError(ValueError, NotImplementedError):
    """Factored event updates asked for from several processes: gathering them is not built yet (a
    ``ValueError`` for the setting that asks for it, a ``NotImplementedError`` for what is missing)."""


def check_gatherable(
    factored: bool, processes: int | str, option: str = "factored=True", dense: str = "factored=False"
):
    """Factored events are collected on one process only: refuse ``factored`` with more than one process
    (``processes``: their number, or a word when unknown), naming the ``option`` that asked for it and the
    ``dense`` setting that works."""
    if factored and processes != 1:
        raise NotGatheredError(
            f"{option}: factored events from {processes} processes are not gathered yet; run one process, or "
            f"collect dense events ({dense})"
        )


class UpdateCollector:
    """Collects per-event and per-step updates of selected parameters from any PyTorch loop.

    Usage in a hand-written loop::

        col = UpdateCollector(model, ["*.weight"], lr=1e-3, event_store=store)
        with col.capture():
            loss = per_event_losses.sum()
            loss.backward()
        col.before_step(); opt.step(); col.after_step(step, labels)

    Per-event updates need every selected parameter to be an ``nn.Linear`` weight or bias. ``step_rank``
    stores each step update of a weight matrix as the factors of its randomized rank-``step_rank`` SVD, with
    the kept fraction of its squared norm as the label ``<var>__kept`` (an Adam step is not low rank: dense
    step updates of large models fill a disk, 304 MiB a step for SmolLM2's MLP matrices). ``lr`` is one
    learning rate, or one per selected parameter (``{name: lr}``); a loop with a schedule sets ``col.lr``
    before each ``after_step``.
    """

    def __init__(
        self,
        model: nn.Module,
        params,
        *,
        lr: float | dict[str, float],
        optimizer=None,
        convention: str = "sgd",
        event_store: UpdateStore | None = None,
        step_store: UpdateStore | None = None,
        buffer: RingBuffer | None = None,
        events: bool = True,
        scale: float = 1.0,
        every: int = 1,
        group_by: str | None = None,
        factored: bool = False,
        max_rank: int | None = None,
        step_rank: int | None = None,
    ):
        check_convention(convention, factored)
        if factored and group_by is not None:
            raise ValueError("factored=True with group_by is not supported yet: collect per-completion events")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be >= 1 (or None: exact), got {max_rank}")
        if step_rank is not None and step_rank < 1:
            raise ValueError(f"step_rank must be >= 1 (or None: dense step updates), got {step_rank}")
        if convention == "adam" and optimizer is None:
            raise ValueError("convention='adam' needs the optimizer (its second moments precondition each event)")
        self.model, self.lr, self.optimizer, self.convention = model, lr, optimizer, convention
        self.params = select_params(model, params)
        self.event_store, self.step_store, self.buffer = event_store, step_store, buffer
        self.events, self.scale, self.every, self.group_by = events, scale, every, group_by
        self.factored, self.max_rank, self.step_rank = factored, max_rank, step_rank
        self._kept: list[dict[str, torch.Tensor]] = []
        self._linear = {}
        if events:
            owners = param_owners(model)
            bad = [n for n in self.params if not isinstance(owners[n][1], nn.Linear)]
            if bad:
                raise ValueError(non_linear_message(model, bad, owners))
            for n in self.params:
                mname, mod, pname = owners[n]
                self._linear.setdefault(mname, (mod, {}))[1][pname] = n
        self._pairs: dict[str, list] = {}
        self._forwards: dict[str, int] = {}
        self._event_grads: list[dict[str, torch.Tensor]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._handles = []

    def active(self, step: int) -> bool:
        return step % self.every == 0

    @contextmanager
    def capture(self, enabled: bool = True):
        """Record the (layer input, output gradient) pairs of one forward/backward.

        A pair is kept when the layer's output receives its gradient (a tensor hook set by the forward hook
        holds the input until then), so forwards that never get a gradient do not count: generation, log-prob
        passes under ``no_grad``, and the first or the recompute forward of gradient checkpointing (reentrant
        or not: whichever output the gradient reaches is the one kept).
        """
        if not (enabled and self.events):
            yield
            return
        self._pairs = {m: [] for m in self._linear}
        self._forwards = dict.fromkeys(self._linear, 0)

        def fwd_hook(mname):
            def hook(mod, inputs, output):
                self._forwards[mname] += 1
                if not (isinstance(output, torch.Tensor) and output.requires_grad):
                    return
                x = inputs[0].detach()

                def on_grad(g, x=x):
                    self._pairs[mname].append((x, g.detach()))

                output.register_hook(on_grad)

            return hook

        handles = [mod.register_forward_hook(fwd_hook(m)) for m, (mod, _) in self._linear.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._event_grads.append(self._per_event_grads())

    def _per_event_grads(self) -> dict[str, torch.Tensor]:
        out, kept = {}, {}
        for mname, (_mod, pnames) in self._linear.items():
            pairs = self._pairs[mname]
            if len(pairs) != 1:
                why = (
                    "its output received no gradient (was the layer called as a module, and did the loss depend on it?)"
                    if not pairs
                    else f"{len(pairs)} of its outputs received a gradient: the layer is used several times in one "
                    "forward (a shared module), or several backwards ran"
                )
                raise RuntimeError(
                    f"layer {mname} ran {self._forwards[mname]} forward(s) inside one capture and {why}; capture "
                    "exactly one forward and backward whose gradient reaches the layer once"
                )
            x, d = pairs[0]
            x, d = x.float(), d.float()
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            d = d.reshape(d.shape[0], -1, d.shape[-1])
            for pname, full in pnames.items():
                if pname == "weight" and self.factored:
                    out[full], kept[var_name(full) + "__kept"] = factorize(d * self.scale, x, self.max_rank)
                elif pname == "weight":
                    out[full] = torch.einsum("nto,nti->noi", d, x) * self.scale
                else:
                    out[full] = d.sum(1) * self.scale
        self._pairs, self._forwards = {}, {}
        if kept:
            self._kept.append(kept)
        return out

    def before_step(self) -> None:
        if self.step_store is not None:
            self._before = {n: p.detach().float().clone() for n, p in self.params.items()}

    def event_gradients(self) -> dict[str, torch.Tensor]:
        """Raw per-event gradients captured since the last step, concatenated over micro-batches."""
        if not self._event_grads:
            return {}
        out = {}
        for n, first in self._event_grads[0].items():
            parts = [g[n] for g in self._event_grads]
            # micro-batches of different lengths: cat_factored pads the factor axis
            out[n] = cat_factored(parts) if isinstance(first, Factored) else torch.cat(parts)
        return out

    def last_event_gradients(self) -> dict[str, torch.Tensor | Factored]:
        """The raw per-event gradients of the latest capture (one micro-batch) since the last step."""
        if not self._event_grads:
            raise RuntimeError("no capture since the last step: call capture() around a forward and backward first")
        return self._event_grads[-1]

    def pop_event_gradients(self) -> dict[str, torch.Tensor | Factored]:
        """:meth:`event_gradients`, then forget them (as a step does): the next capture starts a new step."""
        grads = self.event_gradients()
        self._event_grads = []
        return grads

    def kept_fractions(self) -> dict[str, torch.Tensor]:
        """``{"<var>__kept": kept fraction of ||U_e||^2 per event}`` of the events captured since the last step,
        for the matrices compressed to ``max_rank`` factors (empty when nothing was compressed)."""
        if not self._kept:
            return {}
        return {key: torch.cat([k[key] for k in self._kept]) for key in self._kept[0]}

    def _preconditioner(self, name: str) -> torch.Tensor:
        p = self.params[name]
        state = self.optimizer.state[p]
        group = next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"].float() / (1 - beta2**t)
        return 1.0 / (v_hat.sqrt() + eps)

    def after_step(
        self, step: int, labels: dict[str, np.ndarray] | None = None, gather=None
    ) -> dict[str, torch.Tensor]:
        """Turn captured gradients into event updates and the parameter change into a step update.

        ``gather`` (e.g. ``accelerator.gather``) collects tensors from every process.
        Returns the event updates (after the convention) of this step.
        """
        updates = {}
        if self._event_grads:
            grads = self.pop_event_gradients()
            for n, g in grads.items():
                lr = self.lr[n] if isinstance(self.lr, dict) else self.lr
                if isinstance(g, Factored):
                    updates[n] = Factored(-lr * g.left, g.right)
                    continue
                u = -lr * g
                if self.convention == "adam":
                    u = u * self._preconditioner(n).to(u.device)
                updates[n] = u
            kept = self.kept_fractions()
            if kept:
                labels = {**(labels or {}), **{key: k.cpu().numpy() for key, k in kept.items()}}
                self._kept = []
            if gather is not None:
                check_gatherable(self.factored, "several")
                updates = {n: gather(u.contiguous()) for n, u in updates.items()}
            updates = {
                n: Factored(u.left.cpu(), u.right.cpu()) if isinstance(u, Factored) else u.cpu()
                for n, u in updates.items()
            }
            if self.group_by is not None and labels:
                updates, labels = group_events(updates, labels, self.group_by)
            if self.event_store is not None:
                self.event_store.append(updates, labels or {}, step)
            if self.buffer is not None:  # factored where the buffer holds factored events, else made dense
                self.buffer.add(updates, {k: v for k, v in (labels or {}).items() if not k.endswith("__kept")})
        if self.step_store is not None and self._before:
            delta, step_labels = {}, {"step": np.array([step])}
            for n, p in self.params.items():
                d = (p.detach().float() - self._before[n])[None]
                if self.step_rank is not None and d.ndim == 3:  # a weight matrix: its randomized rank-r factors
                    f, kept = randomized_rank(d, self.step_rank)
                    delta[n] = Factored(f.left.cpu(), f.right.cpu())
                    step_labels[var_name(n) + "__kept"] = kept.cpu().numpy()
                else:
                    delta[n] = d.cpu()
            self.step_store.append(delta, step_labels, step)
            self._before = {}
        return updates

    def flush(self) -> None:
        for s in (self.event_store, self.step_store):
            if s is not None:
                s.flush()


def param_owners(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """``{parameter name: (module name, module, the parameter's name in it)}``."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _p in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
    return owners


def linear_patterns(model: nn.Module, exclude=()) -> list[str]:
    """Glob patterns covering the ``nn.Linear`` weights of ``model`` (but the modules named in ``exclude``):
    layer indices become ``*`` (``model.layers.*.mlp.down_proj.weight``), in module order."""
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mname not in exclude:
            pat = re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", f"{mname}.weight")
            if pat not in out:
                out.append(pat)
    return out


def non_linear_message(model: nn.Module, bad: list[str], owners: dict, exclude=()) -> str:
    """Why parameters ``bad`` (not owned by an ``nn.Linear``) cannot have per-event updates, and what can
    (the Linear layers but those named in ``exclude``)."""
    shown = ", ".join(f"{n!r} ({type(owners[n][1]).__name__})" for n in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    linear = linear_patterns(model, exclude)
    can = ", ".join(repr(p) for p in linear[:12]) + (" ..." if len(linear) > 12 else "")
    return (
        f"per-event updates need nn.Linear parameters; the selection matches {len(bad)} that are not: {shown}{more} "
        f"(e.g. {bad[0]!r} belongs to a {type(owners[bad[0]][1]).__name__}). Narrow the patterns to Linear layers "
        f"(this model's: {can or 'none'}), or collect step updates only"
    )


def group_events(updates: dict[str, torch.Tensor], labels: dict[str, np.ndarray], key: str = "group"):
    """Sum the updates of events that share ``labels[key]`` (e.g. one prompt's G completions).

    Labels of a group: float labels are averaged (reward, advantage, clause values), integer
    labels take the group's first value (step, task, group), and ``n_events`` counts the events.
    """
    ids, first, inverse = np.unique(labels[key], return_index=True, return_inverse=True)
    inv = torch.from_numpy(inverse)
    out = {n: torch.zeros((len(ids), *u.shape[1:]), dtype=u.dtype).index_add_(0, inv, u) for n, u in updates.items()}
    counts = np.bincount(inverse)
    lab = {}
    for k, v in labels.items():
        v = np.asarray(v)
        lab[k] = (np.bincount(inverse, weights=v) / counts).astype(v.dtype) if v.dtype.kind == "f" else v[first]
    lab["n_events"] = counts.astype(np.int64)
    return out, lab
