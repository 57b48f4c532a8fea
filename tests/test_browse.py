"""Shard cards (shardlib.browse) on a shard stage trained here on a small labelled store."""

import numpy as np
import pytest
import torch

from shardlib import browse, shards
from shardlib.planted import planted_updates
from shardlib.updates import UpdateStore


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browse")
    n = 64
    data, _, codes, _ = planted_updates({"w": (6, 5), "b": (6,)}, n_shards=3, n_events=n, active_per_event=1.0)
    kind, step = np.abs(codes.numpy()).argmax(1), np.arange(n) // 8
    st = UpdateStore(tmp / "store", "event", "sgd", "test")
    for s in np.unique(step):
        i = step == s
        labels = {
            "step": step[i],
            "task": kind[i],
            "reward": np.ones(i.sum()),
            "advantage": np.sign(codes.numpy().sum(1))[i],
            "prompt_text": np.array([f"<bos> q{k} =" for k in kind[i]], dtype=object),
            "completion_text": np.array([f"a{k} <eos>" for k in kind[i]], dtype=object),
        }
        st.append({k: v[torch.from_numpy(i)] for k, v in data.items()}, labels, int(s))
    st.flush()
    p = dict(store_path=str(tmp / "store"), n_latents=4, k=1, rank=1, epochs=3, batch_size=16, device="cpu")
    shards.run(shards.ShardParams.from_dict({**p, "out_dir": str(tmp / "shards")}), progress=False)
    return tmp / "shards"


def test_a_card_shows_events_types_where_and_nearest(stage):
    b = browse.Browser(stage)
    idx = b.index()
    assert len(idx) == 4 and idx["fires on"].sum() >= 64  # k = 1: every nonzero event fires one shard
    i = int(idx["fires on"].idxmax())
    card = b.card(i)
    assert card._repr_html_() == card.html and f"<h3 id='shard-{i}'>Shard {i}</h3>" in card.html
    assert "<code>&lt;bos&gt; q" in card.html and "a" in card.html  # prompt and completion text, escaped
    assert card.html.count("<tr>") >= 6 and "data:image/png;base64," in card.html
    assert "Event types it fires on" in card.html and "Where it lives" in card.html and "other shards" in card.html
    assert "Not measured (no analysis given)" in card.html
    g = b.gram()
    assert np.allclose(np.diag(g), 1.0) and np.allclose(g, g.T)
    with pytest.raises(IndexError, match="this stage has shards 0..3"):
        b.card(4)


def test_cards_page_sorts_without_a_server(stage):
    page = browse.cards_page(stage, title="test")
    assert "function sortTable" in page and page.count("class='shard-card'") == 4
    assert "http" not in page
