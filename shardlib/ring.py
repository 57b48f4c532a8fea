"""A fixed-capacity buffer of the most recent updates, in memory (the online SAE's training data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .factored import LEFT, RIGHT, Factored, _tensors, pad_factors, take


class RingBuffer:
    """Fixed-capacity buffer of the most recent updates (flattened per parameter).

    Matrices named in ``factored`` are held as :class:`Factored` events: memory per event
    ``factors * (d_out + d_in)`` instead of ``d_out * d_in``; the factor axis grows to the largest
    factor count added (events with fewer are padded with zero rows), and ``sample`` returns them
    factored.
    """

    def __init__(self, shapes: dict[str, tuple], capacity: int, dtype=torch.float32, factored=()):
        if capacity < 1:
            raise ValueError(f"ring buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.shapes = capacity, dict(shapes)
        self.factored = [n for n in shapes if n in set(factored)]
        for n in self.factored:
            if len(self.shapes[n]) != 2:
                raise ValueError(f"ring buffer: {n!r} has shape {self.shapes[n]}; only matrices can be factored")
        self.data = {
            n: Factored(torch.zeros((capacity, 0, s[0]), dtype=dtype), torch.zeros((capacity, 0, s[1]), dtype=dtype))
            if n in self.factored
            else torch.zeros((capacity, *s), dtype=dtype)
            for n, s in shapes.items()
        }
        self.labels: dict[str, np.ndarray] = {}
        self.size = 0
        self.cursor = 0
        self.total_added = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.data.values() for t in _tensors(v))

    def add(self, updates: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> None:
        first_value = next(iter(updates.values()))
        n = first_value.n_events if isinstance(first_value, Factored) else first_value.shape[0]
        first = max(0, n - self.capacity)  # more events than capacity: only the last `capacity` stay
        idx = (self.cursor + torch.arange(first, n)) % self.capacity
        for k, v in updates.items():
            if k in self.factored:
                if not isinstance(v, Factored):
                    raise TypeError(f"ring buffer: {k!r} holds factored events; got a dense tensor")
                buf = self.data[k]
                m = max(buf.n_factors, v.n_factors)
                buf, v = pad_factors(buf, m), pad_factors(v, m)
                v = v.take(slice(first, None))
                buf.left[idx], buf.right[idx] = v.left.to(buf.left.dtype), v.right.to(buf.right.dtype)
                self.data[k] = buf
            else:
                if isinstance(v, Factored):
                    v = v.dense()
                self.data[k][idx] = v[first:].to(self.data[k].dtype)
        for k, v in labels.items():
            if np.asarray(v).dtype.kind in "OUS":  # text labels stay in the stores, not the buffer
                continue
            if k not in self.labels:
                self.labels[k] = np.zeros(self.capacity, dtype=np.asarray(v).dtype)
            self.labels[k][idx.numpy()] = np.asarray(v)[first:]
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.total_added += n

    def contents(self) -> dict:
        """The events held now (oldest slots first as stored): ``{name: tensor or Factored}``, float32."""
        return {k: take(v, slice(0, self.size)).to(torch.float32) for k, v in self.data.items()}

    def sample(self, n: int, generator: torch.Generator) -> dict:
        if self.size == 0:
            raise ValueError("ring buffer is empty")
        idx = torch.randint(self.size, (n,), generator=generator)
        return {k: take(v, idx).to(torch.float32) for k, v in self.data.items()}

    def save(self, path) -> None:
        """Contents and position into folder ``path`` (part of an RL checkpoint)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k, v in self.data.items():
            if isinstance(v, Factored):
                tensors[k + LEFT], tensors[k + RIGHT] = v.left.contiguous(), v.right.contiguous()
            else:
                tensors[k] = v.contiguous()
        save_file(tensors, str(path / "data.safetensors"))
        np.savez(path / "labels.npz", **self.labels)
        (path / "state.json").write_text(
            json.dumps(
                {
                    "size": self.size,
                    "cursor": self.cursor,
                    "total_added": self.total_added,
                    "capacity": self.capacity,
                    "shapes": {k: list(v) for k, v in self.shapes.items()},
                    "factored": self.factored,
                }
            )
        )

    def load(self, path) -> None:
        """Restore what ``save`` wrote; the buffer must have the same capacity and tensors."""
        from safetensors.torch import load_file

        path = Path(path)
        st = json.loads((path / "state.json").read_text())
        same = st["capacity"] == self.capacity and st["shapes"] == {k: list(v) for k, v in self.shapes.items()}
        if not same or st.get("factored", []) != self.factored:
            raise ValueError(
                f"{path} holds a ring buffer of capacity {st['capacity']} over {st['shapes']} (factored: "
                f"{st.get('factored', [])}); this one has capacity {self.capacity} over {self.shapes} (factored: "
                f"{self.factored})"
            )
        data = load_file(str(path / "data.safetensors"))
        self.data = {
            k: Factored(data[k + LEFT].to(v.left.dtype), data[k + RIGHT].to(v.right.dtype))
            if isinstance(v, Factored)
            else data[k].to(v.dtype)
            for k, v in self.data.items()
        }
        with np.load(path / "labels.npz") as z:
            self.labels = {k: z[k] for k in z.files}
        self.size, self.cursor, self.total_added = st["size"], st["cursor"], st["total_added"]
