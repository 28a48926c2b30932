"""The trainer's named steps, each alone: pairs, teacher source, features, one training step, resume, pair CKA."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator

from circuit_distill.distill.cache import build_cache, teacher_outputs
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.features import alignment_features, as_rows, pair_cka
from circuit_distill.distill.objectives import get_objective
from circuit_distill.distill.pairs import choose_pairs
from circuit_distill.distill.state import batch_indices, restore_state, save_checkpoint, start_training
from circuit_distill.distill.teacher import open_teacher_source, teacher_needed
from circuit_distill.distill.trainer import train_step
from circuit_distill.errors import ConfigError
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, capture, load_model
from circuit_distill.tasks import make_task
from circuit_distill.tasks.base import Batch
from circuit_distill.tasks.positions import select_rows, task_positions

H = Component.make_head
CMAP = ComponentMap([(H(1, 0), H(2, 1)), (H(0, 2), H(1, 3)), (H(1, 3), H(0, 0))])


@pytest.fixture(scope="module")
def dirs(distill_pair_dirs):
    return distill_pair_dirs


@pytest.fixture(scope="module")
def teacher(dirs):
    return load_model(dirs[0], check=False)


@pytest.fixture(scope="module")
def td(teacher):
    """Induction prompts whose odd rows are left-padded by 3 tokens, so "all" selects fewer rows than batch * seq."""
    data = make_task("induction", teacher.tokenizer, 24, seed=0, seq_len=10, segment_len=(2, 4))
    mask = data.clean.attention_mask.clone()
    mask[1::2, :3] = 0
    return dataclasses.replace(data, clean=Batch(data.clean.input_ids, mask))


def student_of(dirs):
    return load_model(dirs[1], check=False)


def test_pairs_step(teacher, tmp_path, td):
    cfg = DistillConfig(objective="ce+random_cka", seed=3)
    random = choose_pairs(get_objective("ce+random_cka"), CMAP, cfg, teacher=teacher)
    assert sorted(random.student_components) == sorted(CMAP.student_components)  # the trained heads stay
    assert set(random.teacher_components) <= set(teacher.components("head"))
    assert choose_pairs(get_objective("ce+random_cka"), CMAP, cfg, teacher=teacher).pairs == random.pairs
    others = {tuple(choose_pairs(get_objective("ce+random_cka"), CMAP, DistillConfig(seed=s), teacher=teacher).pairs)
              for s in range(6)}
    assert len(others) > 1  # the seed changes the pairing
    # without the teacher, the pool is the heads of the cache
    cache = build_cache(teacher, td, [H(0, 1), H(2, 2)], "all", tmp_path)
    from_cache = choose_pairs(get_objective("random_cka"), CMAP, cfg, cache=cache)
    assert set(from_cache.teacher_components) <= {H(0, 1), H(2, 2)}
    assert choose_pairs(get_objective("ce+align_cka"), CMAP, cfg, teacher=teacher) is CMAP
    assert choose_pairs(get_objective("ce"), None, DistillConfig(trainable="all")) is None
    with pytest.raises(ConfigError, match="needs a component map"):
        choose_pairs(get_objective("ce+align_cka"), None, cfg)
    with pytest.raises(ConfigError, match="random pairs need the teacher"):
        choose_pairs(get_objective("ce+random_cka"), CMAP, cfg)


def test_teacher_source_step(teacher, td, tmp_path):
    comps = CMAP.teacher_components
    idx = torch.tensor([5, 0, 17, 5])
    ref_acts, ref_logits = teacher_outputs(teacher, td, comps, "all", idx)
    online = open_teacher_source(get_objective("kd"), DistillConfig(use_cache=False), td, comps, teacher=teacher)
    built = open_teacher_source(get_objective("kd"), DistillConfig(use_cache=True), td, comps, teacher=teacher)
    assert online.cache is None and built.cache is not None and built.cache.path is None  # in memory only
    on_disk = open_teacher_source(get_objective("kd"), DistillConfig(), td, comps, teacher=teacher, out=tmp_path)
    assert (tmp_path / "teacher_cache" / "index.json").exists() and on_disk.cache.path == tmp_path / "teacher_cache"
    for source in (online, built, on_disk):
        acts, logits = source.outputs(idx)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        for c in comps:
            torch.testing.assert_close(acts[c], ref_acts[c], atol=1e-5, rtol=0)
    gold = open_teacher_source(get_objective("ce"), DistillConfig(labels="gold"), td, [])
    assert not gold.needed and not teacher_needed(get_objective("ce"), "gold") and teacher_needed(get_objective("ce"), "teacher")
    with pytest.raises(ConfigError, match="needs the teacher"):
        open_teacher_source(get_objective("kd"), DistillConfig(use_cache=False), td, comps)
    with pytest.raises(ConfigError, match="positions"):
        open_teacher_source(get_objective("kd"), DistillConfig(positions="last"), td, comps, cache=built.cache)


@pytest.mark.parametrize("positions, rows", [("all", [3, 4, 5, 6]), ("all", [0, 2, 4]), ("last", [3, 4, 5, 6])])
def test_features_step_equals_select_rows_by_hand(dirs, teacher, td, positions, rows):
    student = student_of(dirs)
    idx = torch.tensor(rows)
    b = td.clean.subset(idx)
    assert bool(b.attention_mask.all()) == (rows == [0, 2, 4])  # both the padded and the unpadded path
    pos = task_positions(td, positions, idx)
    pairs = list(CMAP.pairs)
    t_acts, _ = teacher_outputs(teacher, td, CMAP.teacher_components, positions, idx)
    with capture(student, CMAP.student_components, detach=True) as cap:
        student(b.input_ids, b.attention_mask)
    s_feats, t_feats = alignment_features(cap, t_acts, b.attention_mask, pos, pairs, "cpu")
    order = sorted(pairs) if positions == "all" else pairs  # "all" stacks the pairs sorted by head
    for i, (s, t) in enumerate(order):
        want_s = select_rows(cap[s], b.attention_mask, pos)
        want_t = as_rows(t_acts[t], b.attention_mask, pos)
        assert want_s.shape[0] == (int(b.attention_mask.sum()) if positions == "all" else len(idx))
        assert torch.equal(s_feats[i], want_s) and torch.equal(t_feats[i], want_t)
    if positions == "all":
        assert s_feats.shape == (3, int(b.attention_mask.sum()), 8) and t_feats.shape[:2] == s_feats.shape[:2]


def _hand_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_pair_cka_equals_a_hand_computation(dirs, teacher, td, tmp_path, positions):
    student = student_of(dirs)
    n = 16
    got = pair_cka(student, CMAP.pairs, td, positions, teacher=teacher, n=n)
    idx = torch.arange(n)
    b = td.clean.subset(idx)
    pos = task_positions(td, positions, idx)
    with capture(student, CMAP.student_components, detach=True) as cs, \
            capture(teacher, CMAP.teacher_components, detach=True) as ct:
        student(b.input_ids, b.attention_mask)
        teacher(b.input_ids, b.attention_mask)
    want = [_hand_cka(select_rows(cs[s], b.attention_mask, pos), select_rows(ct[t], b.attention_mask, pos))
            for s, t in CMAP.pairs]
    assert got == pytest.approx(want, abs=1e-5) and len(set(got)) == 3
    cache = build_cache(teacher, td, CMAP.teacher_components, positions, tmp_path)
    assert pair_cka(student, CMAP.pairs, td, positions, cache=cache, n=n) == pytest.approx(got, abs=1e-5)
    assert pair_cka(student, [], td, positions, teacher=teacher) == []
    with pytest.raises(ConfigError, match="needs the teacher"):
        pair_cka(student, CMAP.pairs, td, positions)


def test_train_step_and_resume_restore_the_exact_state(dirs, teacher, td, tmp_path):
    cfg = DistillConfig(objective="ce+align_cka", steps=4, batch_size=6, lr=1e-2, warmup=3, use_cache=False)
    obj, pairs = get_objective(cfg.objective), list(CMAP.pairs)
    source = open_teacher_source(obj, cfg, td, CMAP.teacher_components, teacher=teacher)

    def start(student):
        return start_training(student, cfg, CMAP.student_components, Accelerator(cpu=True), tmp_path / "ckpt.pt")

    student = student_of(dirs)
    a = start(student)
    for _ in range(2):
        a.log(train_step(a, student, td, source, pairs, obj, cfg))
    assert [r["step"] for r in a.history] == [1, 2] and {"ce", "align", "total", "lr"} <= set(a.history[0])
    assert a.history[0]["lr"] == pytest.approx(cfg.lr * 2 / 3)  # warmup: (step + 1) / warmup after one step
    save_checkpoint(a, cfg)
    torch.manual_seed(123)  # the checkpoint's RNG state must come back
    b = start(student_of(dirs))
    restore_state(b, cfg)
    assert b.step == 2 and b.history == a.history
    assert torch.equal(b.trainable.named_parameters()[0][1], a.trainable.named_parameters()[0][1])
    assert b.scheduler.state_dict() == a.scheduler.state_dict()
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert torch.equal(torch.get_rng_state(), torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"])
    with pytest.raises(ConfigError, match="different config"):
        restore_state(start(student_of(dirs)), DistillConfig(**{**cfg.to_dict(), "lr": 1.0}))
    with pytest.raises(ConfigError, match="no checkpoint"):
        restore_state(start_training(student_of(dirs), cfg, CMAP.student_components, Accelerator(cpu=True)), cfg)


def test_batch_indices_are_seeded_epochs():
    first = torch.cat([batch_indices(10, 4, m, seed=1) for m in range(5)])  # two epochs of 10
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 3, seed=1), first[12:16])
    assert not torch.equal(batch_indices(10, 4, 0, seed=2), first[:4])
