"""Interchange-intervention training: sources, swaps, identity, dead heads, trainable subset, cache, resume, IIA."""

import json

import pytest
import torch

from circuit_distill.distill.cache import TeacherCache, build_cache
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.iit import (
    Interchange,
    cache_interchanges,
    counterpart_rows,
    interchange_batch,
    interchange_logits,
    pair_iia,
    step_heads,
    swap_into_base,
    teacher_head_sets,
    teacher_iit_logits,
)
from circuit_distill.distill.objectives import get_objective, objective_loss
from circuit_distill.distill.trainer import distill
from circuit_distill.errors import ConfigError
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, capture, load_model
from circuit_distill.tasks import make_task
from conftest import interrupt_after_first_checkpoint

H = Component.make_head
CMAP = ComponentMap([(H(1, 0), H(2, 1)), (H(1, 2), H(1, 3))])


@pytest.fixture(scope="module")
def dirs(distill_pair_dirs):
    return distill_pair_dirs


@pytest.fixture(scope="module")
def teacher(dirs):
    return load_model(dirs[0], check=False)


@pytest.fixture(scope="module")
def data(teacher):
    tok = teacher.tokenizer
    return (make_task("induction", tok, 40, seed=0, seq_len=10, segment_len=(2, 4)),
            make_task("induction", tok, 16, seed=1, seq_len=10, segment_len=(2, 4)))


def cfg(**kw):
    base = dict(objective="ce+iit", steps=6, batch_size=8, lr=1e-2, eval_every=3, seed=0, use_cache=False)
    return DistillConfig(**{**base, **kw})


def clean_answer_logits(model, td, idx):
    b = td.clean.subset(idx)
    logits = model(b.input_ids, b.attention_mask)
    return logits[torch.arange(len(idx)), td.positions["last"][idx]]


def test_counterparts_are_fixed_derangements_in_either_role(data):
    train, _ = data
    n = len(train)
    other = counterpart_rows(train, "other", seed=0)
    assert sorted(other.tolist()) == list(range(n)) and bool((other != torch.arange(n)).all())
    assert torch.equal(other, counterpart_rows(train, "other", seed=0))
    assert not torch.equal(other, counterpart_rows(train, "other", seed=1))
    same = counterpart_rows(train, "same_answer")
    assert torch.equal(train.answer_ids[same], train.answer_ids)
    shared = torch.tensor([int((train.answer_ids == a).sum()) > 1 for a in train.answer_ids])
    assert bool((same[shared] != torch.arange(n)[shared]).all()) and torch.equal(same[~shared], torch.arange(n)[~shared])
    assert torch.equal(counterpart_rows(train, "self"), torch.arange(n))
    idx = torch.tensor([3, 0, 7])
    b = interchange_batch(train, idx, Interchange("corrupted"))  # the counterpart is the base by default
    assert torch.equal(b.base.input_ids, train.corrupted.input_ids[idx]) and b.base_pos is None
    assert torch.equal(b.source.input_ids, train.clean.input_ids[idx])
    assert torch.equal(b.last, train.corrupted_positions["last"][idx])
    b = interchange_batch(train, idx, Interchange("other", base="train", positions="earlier,last"))
    assert torch.equal(b.base.input_ids, train.clean.input_ids[idx])
    assert torch.equal(b.source.input_ids, train.clean.input_ids[other[idx]])
    assert torch.equal(b.source_pos[:, 0], train.positions["earlier"][other[idx]])
    assert torch.equal(b.base_pos[:, 1], train.positions["last"][idx]) and torch.equal(b.last, b.base_pos[:, 1])
    b = interchange_batch(train, idx, Interchange("corrupted", positions="earlier"))
    assert torch.equal(b.base_pos[:, 0], train.corrupted_positions["earlier"][idx])
    assert torch.equal(b.source_pos[:, 0], train.positions["earlier"][idx])
    with pytest.raises(ConfigError, match="nowhere"):
        Interchange(positions="nowhere").check(train)
    with pytest.raises(ConfigError, match="iit_counterpart"):
        Interchange("elsewhere")
    with pytest.raises(ConfigError, match="iit_base"):
        DistillConfig(iit_base="source")


def test_swap_takes_the_source_at_named_and_real_positions(data):
    train, _ = data
    idx = torch.arange(4)
    act = torch.randn(8, train.clean.input_ids.shape[1], 5)
    named = interchange_batch(train, idx, Interchange("corrupted", positions="earlier,last"))
    out = swap_into_base(named)(act)
    assert torch.equal(out[:4], act[:4])  # the source rows are never changed
    expect = act[4:].clone()
    for r in range(4):
        for k in range(2):
            expect[r, named.base_pos[r, k]] = act[r, named.source_pos[r, k]]
    assert torch.equal(out[4:], expect)
    every = interchange_batch(train, idx, Interchange("corrupted"))
    both = (every.base.attention_mask.bool() & every.source.attention_mask.bool())
    out = swap_into_base(every)(act)
    assert torch.equal(out[4:][both], act[:4][both]) and torch.equal(out[4:][~both], act[4:][~both])


def test_identical_student_and_teacher_give_zero_loss_and_full_iia(dirs, teacher, data):
    train, held = data
    student = load_model(dirs[0], check=False)
    pairs = [(h, h) for h in (H(0, 1), H(1, 2), H(2, 3))]
    idx = torch.arange(12)
    for setting in (Interchange("corrupted"), Interchange("other", "train", "earlier,last")):
        for heads in ([H(1, 2)], [h for h, _ in pairs]):
            batch = interchange_batch(train, idx, setting)
            s = interchange_logits(student, batch, heads)
            t = teacher_iit_logits(train, idx, heads, setting, teacher=teacher)
            loss, parts = objective_loss("iit", student_iit_logits=s.detach(), teacher_iit_logits=t, temperature=2.0)
            assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(parts["iia"]) == 1.0
            assert float(objective_loss("iit", student_iit_logits=s.detach(), teacher_iit_logits=t, iit_loss="ce")[0]) == \
                pytest.approx(float(torch.nn.functional.cross_entropy(s.detach(), t.argmax(-1))))
        assert pair_iia(student, pairs, held, teacher=teacher, setting=setting) == [1.0, 1.0, 1.0]
    # the same through the trainer: the first step's IIT loss is 0 and its IIA 1
    res = distill(student, train, teacher=teacher, eval_sets={"held": held}, component_map=ComponentMap(pairs),
                  config=cfg(objective="iit", steps=1, eval_every=0, lr=1e-12, weight_decay=0.0),
                  progress=False)  # lr ~0 (lr must be > 0): IIA after it too
    first = res.history[0]
    assert first["iit"] == pytest.approx(0.0, abs=1e-6) and first["iia"] == 1.0
    assert res.history[-1]["eval/iia"] == 1.0


def test_a_head_that_does_not_reach_the_answer_leaves_it_unchanged(dirs, data):
    train, _ = data
    model = load_model(dirs[0], check=False)
    idx = torch.arange(10)

    def unintervened(batch):
        logits = model(batch.base.input_ids, batch.base.attention_mask)
        return logits[torch.arange(len(batch)), batch.last]

    with torch.no_grad():
        every = interchange_batch(train, idx, Interchange("corrupted"))
        plain = unintervened(every)
        assert not torch.allclose(interchange_logits(model, every, [H(2, 1)]), plain, atol=1e-4)  # it does reach
        # the last layer's head at a position before the answer: nothing later reads it
        early = interchange_batch(train, idx, Interchange("corrupted", positions="earlier"))
        assert bool((early.base_pos[:, 0] < early.last).all())
        torch.testing.assert_close(interchange_logits(model, early, [H(2, 1)]), plain, atol=1e-5, rtol=0)
        # a head whose output projection columns are zero: its output reaches nothing
        o = model.arch.o_proj(model.hf, 1).weight
        d = model.arch.d_head
        o[:, 3 * d:4 * d] = 0
        torch.testing.assert_close(interchange_logits(model, every, [H(1, 3)]), unintervened(every),
                                   atol=1e-5, rtol=0)


def test_captured_source_activations_give_the_joint_forward(dirs, data):
    train, _ = data
    model = load_model(dirs[1], check=False)
    heads = [H(0, 1), H(1, 2)]
    for setting in (Interchange("corrupted"), Interchange("other", positions="earlier,last")):
        batch = interchange_batch(train, torch.arange(12), setting)
        joint = interchange_logits(model, batch, heads)
        with capture(model, heads) as cap:
            model(batch.source.input_ids, batch.source.attention_mask)
        split = interchange_logits(model, batch, heads, source_acts={h: cap[h] for h in heads})
        torch.testing.assert_close(split, joint, atol=1e-5, rtol=1e-5)
        split.sum().backward()  # the gradient reaches the source side's heads (their query rows)
        q = dict(model.hf.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
        d = model.arch.d_head
        assert q.grad[d:2 * d].abs().sum() > 0
        model.hf.zero_grad()


def test_gradients_reach_only_the_trainable_subset(dirs, teacher, data):
    train, held = data
    student = load_model(dirs[1], check=False)
    before = {k: v.detach().clone() for k, v in student.hf.named_parameters()}
    t_before = {k: v.detach().clone() for k, v in teacher.hf.named_parameters()}
    res = distill(student, train, teacher=teacher, eval_sets={"held": held}, component_map=CMAP,
                  config=cfg(objective="iit", iit_pairs="all", weight_decay=0.1), progress=False)
    changed = [k for k, v in student.hf.named_parameters() if not torch.equal(v, before[k])]
    assert changed and all("self_attn.q_proj" in k or "self_attn.o_proj" in k for k in changed)
    q = dict(student.hf.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    o = dict(student.hf.named_parameters())["model.layers.1.self_attn.o_proj.weight"]
    d = q.shape[0] // 4
    for rows in (slice(d, 2 * d), slice(3 * d, 4 * d)):  # heads 1 and 3 are not matched
        assert torch.equal(q[rows], before["model.layers.1.self_attn.q_proj.weight"][rows])
        assert torch.equal(o[:, rows], before["model.layers.1.self_attn.o_proj.weight"][:, rows])
    assert not torch.equal(q[:d], before["model.layers.1.self_attn.q_proj.weight"][:d])
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.hf.named_parameters())
    steps = [r for r in res.history if "iit" in r]
    assert len(steps) == 6 and all(r["iit"] > 0 and 0 <= r["iia"] <= 1 for r in steps)
    final = res.history[-1]
    assert final["final"] and set(final) >= {"eval/iia", "eval/iia/L1.H0:L2.H1", "eval/iia/L1.H2:L1.H3"}


def test_cached_and_online_teacher_give_the_same_loss(dirs, teacher, data, tmp_path):
    train, _ = data
    setting = Interchange("corrupted", positions="last")
    cache = build_cache(teacher, train, CMAP.teacher_components, "all", tmp_path / "c", shard_rows=16)
    assert cache_interchanges(cache, teacher, train, teacher_head_sets(CMAP.pairs, "all"), setting,
                              batch_size=7) == [setting.key([H(1, 3)]), setting.key([H(2, 1)]),
                                                setting.key([H(1, 3), H(2, 1)])]
    idx = torch.tensor([5, 1, 30, 2])
    online = teacher_iit_logits(train, idx, [H(2, 1)], setting, teacher=teacher)
    assert torch.equal(cache.intervened(idx, setting.key([H(2, 1)])), online)
    reloaded = TeacherCache.load(tmp_path / "c")  # written to disk and listed in the index
    assert torch.equal(reloaded.intervened(idx, setting.key([H(2, 1)])), online)
    c = cfg(iit_positions="last", iit_pairs="one")
    a = load_model(dirs[1], check=False)
    on = distill(a, train, teacher=teacher, component_map=CMAP, config=c, progress=False)
    b = load_model(dirs[1], check=False)
    off = distill(b, train, teacher=None, cache=reloaded, component_map=CMAP, config=c, progress=False)
    for x, y in zip(on.history, off.history):
        if "iit" in x:
            assert x["iit"] == pytest.approx(y["iit"], abs=1e-6) and x["iia"] == y["iia"]
    for (_, p1), (_, p2) in zip(a.hf.named_parameters(), b.hf.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)
    assert "eval/iia" in off.history[-1]  # IIA on the cached training rows when there is no teacher
    with pytest.raises(ConfigError, match="intervened logits"):
        distill(load_model(dirs[1], check=False), train, cache=cache, component_map=CMAP,
                config=cfg(iit_counterpart="other"), progress=False)


def test_a_run_fills_its_cache_and_random_pairs_are_seeded(dirs, teacher, data, tmp_path):
    train, _ = data
    c = cfg(objective="ce+random_iit", steps=2, use_cache=True, eval_every=0)
    res = distill(load_model(dirs[1], check=False), train, teacher=teacher, component_map=CMAP, config=c,
                  out_dir=tmp_path, progress=False)
    index = json.loads((tmp_path / "teacher_cache" / "index.json").read_text())
    want = [Interchange().key([t]) for t in sorted(set(res.component_map.teacher_components))]
    assert sorted(index["intervened"]) == sorted(want)
    assert res.component_map.student_components == CMAP.student_components
    again = distill(load_model(dirs[1], check=False), train, teacher=teacher, component_map=CMAP, config=c,
                    progress=False)
    assert again.component_map.pairs == res.component_map.pairs
    assert res.component_map.pairs != CMAP.pairs


def test_step_heads_are_a_seeded_function_of_the_step():
    pairs = list(CMAP.pairs)
    picks = [step_heads(pairs, "one", 0, s) for s in range(40)]
    assert picks == [step_heads(pairs, "one", 0, s) for s in range(40)]
    assert {(p[0][0], p[1][0]) for p in picks} == set(pairs)
    assert step_heads(pairs, "all", 0, 3) == ([H(1, 0), H(1, 2)], [H(1, 3), H(2, 1)])
    assert teacher_head_sets(pairs, "one") == [[H(1, 3)], [H(2, 1)]]


def test_objectives_and_existing_ones_unchanged():
    o = get_objective("CE + IIT + Align CKA")
    assert o.uses_ce and o.uses_align and o.uses_iit and o.pairs == "matched" and o.needs_teacher_logits
    r = get_objective("ce+rand_iit")
    assert r.name == "ce+random_iit" and r.pairs == "random" and r.uses_pairs and not r.uses_align
    assert not get_objective("ce+align_cka").uses_iit and not get_objective("kd").uses_iit
    with pytest.raises(ConfigError, match="student_iit_logits"):
        objective_loss("ce+iit", student_logits=torch.zeros(2, 3), labels=torch.zeros(2, dtype=torch.long))


def test_resume_is_exact(dirs, teacher, data, tmp_path):
    train, _ = data
    c = cfg(steps=8, checkpoint_every=4, iit_positions="earlier,last")
    full = load_model(dirs[1], check=False)
    distill(full, train, teacher=teacher, component_map=CMAP, config=c, out_dir=tmp_path / "full", progress=False)
    interrupt_after_first_checkpoint(
        lambda: distill(load_model(dirs[1], check=False), train, teacher=teacher, component_map=CMAP, config=c,
                        out_dir=tmp_path / "int", progress=False), tmp_path / "int")
    resumed = load_model(dirs[1], check=False)
    res = distill(resumed, train, teacher=teacher, component_map=CMAP, config=c, out_dir=tmp_path / "int",
                  progress=False, resume=True)
    assert res.steps == 8
    for (n, p1), (_, p2) in zip(full.hf.named_parameters(), resumed.hf.named_parameters()):
        assert torch.equal(p1, p2), n


@pytest.mark.parametrize("objective, options", [
    ("ce+iit+align_cka", {"iit_base": "train", "iit_counterpart": "other"}),
    ("kd+iit", {"iit_pairs": "all", "iit_loss": "ce", "iit_counterpart": "same_answer", "iit_positions": "last"}),
    ("random_iit", {"iit_counterpart": "self", "iit_lam": 0.5}),
])
def test_every_iit_objective_and_setting_trains(dirs, teacher, data, tmp_path, objective, options):
    train, held = data
    res = distill(load_model(dirs[1], check=False), train, teacher=teacher, eval_sets={"held": held},
                  component_map=CMAP, config=cfg(objective=objective, steps=2, eval_every=1, use_cache=True, **options),
                  out_dir=tmp_path, progress=False)
    steps = [r for r in res.history if "iit" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["total"])) for r in steps)
    obj = get_objective(objective)
    assert ("align" in steps[0]) == obj.uses_align and ("kd" in steps[0]) == obj.uses_kd
    assert "eval/iia" in steps[0] and "eval/iia" in res.history[-1]
    index = json.loads((tmp_path / "teacher_cache" / "index.json").read_text())
    setting = Interchange.of(res_cfg := cfg(objective=objective, **options))
    assert all(setting.key(h) in index["intervened"]
               for h in teacher_head_sets(res.component_map.pairs, res_cfg.iit_pairs))
