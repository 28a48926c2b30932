"""Teacher activation cache: shards + index, rows equal an online teacher forward, losses equal online ones."""

import json

import pytest
import torch

from circuit_distill.distill.cache import TeacherCache, build_cache, teacher_outputs
from circuit_distill.distill.objectives import objective_loss
from circuit_distill.errors import ConfigError
from circuit_distill.model import Component, capture, load_model, tiny_model
from circuit_distill.tasks import make_task
from circuit_distill.tasks.positions import select_rows

T = [Component.make_head(2, 1), Component.make_head(0, 3)]
S = [Component.make_head(1, 0), Component.make_head(0, 2)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    t = load_model(tiny_model("llama", root / "t", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=1), check=False)
    s = load_model(tiny_model("llama", root / "s", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=2), check=False)
    td = make_task("induction", s.tokenizer, 30, seed=0, seq_len=12, segment_len=(2, 4), padding_side="left")
    return t, s, td, root


@pytest.mark.parametrize("positions", ["all", "last"])
def test_rows_match_online_and_shards_written(setup, positions, tmp_path):
    t, s, td, _ = setup
    cache = build_cache(t, td, T, positions, tmp_path, batch_size=7, shard_rows=12)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [sh["stop"] for sh in index["shards"]] == [12, 24, 30] and not list(tmp_path.glob("*.tmp"))
    idx = torch.tensor([29, 3, 14, 3])
    acts, logits = TeacherCache.load(tmp_path).rows(idx)
    ref_acts, ref_logits = teacher_outputs(t, td, T, positions, idx)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for c in T:
        torch.testing.assert_close(acts[c], ref_acts[c], atol=1e-5, rtol=0)
        assert acts[c].shape == ((4, 12, 16) if positions == "all" else (4, 16))
    assert torch.equal(cache.mask[idx], td.clean.attention_mask[idx].long())


def test_losses_equal_online(setup, tmp_path):
    t, s, td, _ = setup
    cache = build_cache(t, td, T, "all", tmp_path)
    idx = torch.arange(5, 21)
    b = td.clean.subset(idx)
    with capture(s, S) as cap:
        logits = s(b.input_ids, b.attention_mask)
    s_last = logits[torch.arange(16), td.positions["last"][idx]]
    s_feats = [select_rows(cap[c], b.attention_mask, "all") for c in S]

    def loss(t_acts, t_logits):
        return objective_loss("kd+align_cka", student_logits=s_last, teacher_logits=t_logits, student_feats=s_feats,
                              teacher_feats=[select_rows(t_acts[c], b.attention_mask, "all") for c in T],
                              temperature=2.0)[0]

    with capture(t, T, detach=True) as tc:
        tl = t(b.input_ids, b.attention_mask)
        online = loss(dict(tc), tl[torch.arange(16), td.positions["last"][idx]])
    cached = loss(*cache.rows(idx))
    assert float(online.detach()) == pytest.approx(float(cached.detach()), abs=1e-6)


def test_cache_mismatch_is_an_error(setup, tmp_path):
    t, s, td, _ = setup
    cache = build_cache(t, td, T[:1], "all", tmp_path)
    with pytest.raises(ConfigError, match="no L0.H3"):
        cache.check(T, "all", len(td))
    with pytest.raises(ConfigError, match="positions"):
        cache.check(T[:1], "last", len(td))
    with pytest.raises(ConfigError, match="not a teacher cache"):
        TeacherCache.load(tmp_path / "nothing")
