"""shardlib.ring: the ring buffer of the most recent updates."""

import numpy as np
import pytest
import torch

from shardlib.ring import RingBuffer


def test_ring_buffer_keeps_the_most_recent_and_bounds_memory():
    b = RingBuffer({"w": (2,)}, capacity=5)
    for i in range(3):
        b.add({"w": torch.full((3, 2), float(i))}, {"step": np.full(3, i)})
    assert b.size == 5 and b.total_added == 9 and b.nbytes == 5 * 2 * 4
    assert sorted(b.labels["step"].tolist()) == [1, 1, 2, 2, 2]
    s = b.sample(100, torch.Generator().manual_seed(0))["w"]
    assert set(s[:, 0].tolist()) <= {1.0, 2.0}


def test_ring_buffer_save_and_load_round_trip(tmp_path):
    buf = RingBuffer({"w": (2, 3)}, capacity=4)
    buf.add({"w": torch.arange(30, dtype=torch.float32).view(5, 2, 3)}, {"task": np.arange(5)})  # wraps around
    buf.save(tmp_path / "b")
    other = RingBuffer({"w": (2, 3)}, capacity=4)
    other.load(tmp_path / "b")
    assert torch.equal(other.data["w"], buf.data["w"]) and (other.labels["task"] == buf.labels["task"]).all()
    assert (other.size, other.cursor, other.total_added) == (4, 1, 5)
    # five events into four slots: the last four stay, the newest where the cursor left off
    assert other.data["w"][:, 0, 0].tolist() == [24.0, 6.0, 12.0, 18.0] and other.labels["task"].tolist() == [
        4,
        1,
        2,
        3,
    ]
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer({"w": (2, 3)}, capacity=8).load(tmp_path / "b")
