"""Trainer: cached vs online, resume, non-finite loss, frozen weights, files written."""

import json

import pytest
import torch

from circuit_distill.distill.cache import build_cache
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.trainer import NonFiniteLossError, distill
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, load_model
from circuit_distill.tasks import make_task
from conftest import interrupt_after_first_checkpoint


@pytest.fixture(scope="module")
def dirs(distill_pair_dirs):
    return distill_pair_dirs


@pytest.fixture
def models(dirs):
    return load_model(dirs[0], check=False), load_model(dirs[1], check=False)


@pytest.fixture(scope="module")
def data(dirs):
    tok = load_model(dirs[1], check=False).tokenizer
    return make_task("induction", tok, 48, seed=0, seq_len=10, segment_len=(2, 4)), make_task("induction", tok, 24, seed=1, seq_len=10, segment_len=(2, 4))


CMAP = ComponentMap([(Component.make_head(1, 0), Component.make_head(2, 1)),
                     (Component.make_head(1, 2), Component.make_head(1, 3))])


def cfg(**kw):
    base = dict(objective="ce+align_cka", steps=6, batch_size=8, lr=1e-3, eval_every=3, seed=0,
                use_cache=False)
    base.update(kw)
    return DistillConfig(**base)


def test_cached_and_online_teacher_train_identically(models, data, dirs, tmp_path):
    teacher, student = models
    train, held = data
    online = distill(student, train, teacher=teacher, component_map=CMAP, config=cfg(), progress=False)
    student2 = load_model(dirs[1], check=False)
    cache = build_cache(teacher, train, CMAP.teacher_components, "all", tmp_path / "c", shard_rows=20)
    assert len(cache.index["shards"]) == 3
    cached = distill(student2, train, teacher=None, cache=cache, component_map=CMAP, config=cfg(), progress=False)
    steps_a = [r for r in online.history if not r.get("final")]
    steps_b = [r for r in cached.history if not r.get("final")]
    assert len(steps_a) == len(steps_b) == 6
    for a, b in zip(steps_a, steps_b):
        for k in ("ce", "align", "total"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (k, a, b)
    for (_, p1), (_, p2) in zip(student.hf.named_parameters(), student2.hf.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)


def test_resume_gives_same_weights(dirs, data, tmp_path):
    train, _ = data
    teacher = load_model(dirs[0], check=False)
    full = load_model(dirs[1], check=False)
    distill(full, train, teacher=teacher, component_map=CMAP, config=cfg(steps=8, checkpoint_every=4),
            out_dir=tmp_path / "full", progress=False)
    # interrupt a second run right after its step-4 checkpoint is written
    interrupted = load_model(dirs[1], check=False)
    c = cfg(steps=8, checkpoint_every=4)
    interrupt_after_first_checkpoint(
        lambda: distill(interrupted, train, teacher=teacher, component_map=CMAP, config=c, out_dir=tmp_path / "int",
                        progress=False), tmp_path / "int")
    resumed = load_model(dirs[1], check=False)
    res = distill(resumed, train, teacher=teacher, component_map=CMAP, config=c, out_dir=tmp_path / "int",
                  progress=False, resume=True)
    assert res.steps == 8
    for (n, p1), (_, p2) in zip(full.hf.named_parameters(), resumed.hf.named_parameters()):
        assert torch.equal(p1, p2), n
    lines = [json.loads(x) for x in (tmp_path / "int" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if not r.get("final")] == list(range(1, 9))


def test_nonfinite_loss_stops_and_keeps_checkpoint(models, data, tmp_path):
    teacher, student = models
    train, _ = data
    c = cfg(steps=6, checkpoint_every=2, lr=1e-3)
    import circuit_distill.distill.trainer as tr

    orig = tr.objective_loss
    n = {"i": 0}

    def bad(*a, **k):
        total, parts = orig(*a, **k)
        n["i"] += 1
        return (total * float("nan") if n["i"] == 3 else total), parts

    tr.objective_loss = bad
    try:
        with pytest.raises(NonFiniteLossError, match="non-finite loss.*step 3.*checkpoint"):
            distill(student, train, teacher=teacher, component_map=CMAP, config=c, out_dir=tmp_path, progress=False)
    finally:
        tr.objective_loss = orig
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["params"].values())


def test_matched_heads_leave_other_weights_identical_and_write_files(models, data, tmp_path):
    teacher, student = models
    train, held = data
    before = {k: v.detach().clone() for k, v in student.hf.named_parameters()}
    res = distill(student, train, teacher=teacher, eval_sets={"held": held}, component_map=CMAP,
                  config=cfg(use_cache=True, weight_decay=0.1), out_dir=tmp_path, progress=False)
    changed = [k for k, v in student.hf.named_parameters() if not torch.equal(v, before[k])]
    assert changed and all("self_attn.q_proj" in k or "self_attn.o_proj" in k for k in changed)
    q = dict(student.hf.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    d = q.shape[0] // 4
    assert torch.equal(q[d:2 * d], before["model.layers.1.self_attn.q_proj.weight"][d:2 * d])  # head 1 untouched
    assert not torch.equal(q[:d], before["model.layers.1.self_attn.q_proj.weight"][:d])
    assert 0 < res.trained_fraction < 0.2
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["trainable"]["count"] == res.trained_params and man["versions"]["torch"] == torch.__version__
    assert man["config"]["objective"] == "ce+align_cka" and man["component_map"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/held/accuracy" in r for r in lines) and lines[-1]["final"]
    assert "held" in res.final_eval and len(res.pair_cka) == 2
    assert (tmp_path / "student" / "config.json").exists() and (tmp_path / "teacher_cache" / "index.json").exists()


def test_random_pairs_are_seeded(models, data):
    teacher, student = models
    train, _ = data
    a = distill(student, train, teacher=teacher, component_map=CMAP, config=cfg(objective="ce+random_cka", steps=1),
                progress=False)
    b = distill(student, train, teacher=teacher, component_map=CMAP, config=cfg(objective="ce+random_cka", steps=1),
                progress=False)
    assert a.component_map.pairs == b.component_map.pairs


def test_alignment_without_map_is_a_clear_error(models, data):
    teacher, student = models
    from circuit_distill.errors import ConfigError
    with pytest.raises(ConfigError, match="component map"):
        distill(student, data[0], teacher=teacher, config=cfg(), progress=False)


@pytest.mark.slow
def test_cli_under_accelerate_two_processes(dirs, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): same alignment losses as one process."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent
    yaml_text = (f"teacher: {dirs[0]}\nstudent: {dirs[1]}\ntask: induction\n"
                 "task_options: {seq_len: 10, segment_len: [2, 4]}\nn_train: 32\nn_eval: 16\nsteps: 3\n"
                 "batch_size: 8\neval_every: 0\ncircuit_size: 2\nmatching: random\n")
    (tmp_path / "c.yaml").write_text(yaml_text)
    accel = shutil.which("accelerate", path=str(exe)) or str(exe / "accelerate")
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cmd = [accel, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *(["--multi_gpu"] if n == 2 else ["--cpu"]), "--num_processes", str(n), "-m", "circuit_distill.cli",
               "distill", "--config", str(tmp_path / "c.yaml"), f"out_dir={out}", "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        man = json.loads((out / "manifest.json").read_text())
        assert man["num_processes"] == n
        runs[n] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[1], runs[2]):
        if "align" in a:
            assert a["align"] == pytest.approx(b["align"], abs=1e-5)
            assert a["ce"] == pytest.approx(b["ce"], abs=1e-4)


def _right_padded(td, drop: int = 3):
    """``td`` with the last ``drop`` tokens of every even row turned into padding (mask 0, ``last`` moved)."""
    import dataclasses

    from circuit_distill.tasks.base import Batch

    mask = td.clean.attention_mask.clone()
    last = td.positions["last"].clone()
    mask[::2, -drop:] = 0
    last[::2] = mask.shape[1] - drop - 1
    return dataclasses.replace(td, clean=Batch(td.clean.input_ids, mask), positions={**td.positions, "last": last})


@pytest.mark.parametrize("padded", [False, True])
def test_logged_alignment_equals_per_pair_cka_by_hand(models, data, dirs, padded):
    """The trainer's batched alignment (one row selection per layer, one batched CKA) logs the same
    step-1 loss as one ``select_rows(..., "all")`` + CKA per pair on the same batch and weights."""
    from circuit_distill.distill.cache import teacher_outputs
    from circuit_distill.distill.losses import alignment_loss
    from circuit_distill.distill.state import batch_indices
    from circuit_distill.model.hooks import capture
    from circuit_distill.tasks.positions import select_rows

    teacher, student = models
    train = _right_padded(data[0]) if padded else data[0]
    assert bool((train.clean.attention_mask == 0).any()) == padded
    c = cfg(steps=1, eval_every=0)
    logged = distill(student, train, teacher=teacher, component_map=CMAP, config=c, progress=False).history[0]
    fresh = load_model(dirs[1], check=False)
    idx = batch_indices(len(train), c.batch_size, 0, c.seed)
    b = train.clean.subset(idx)
    s_comps = [s for s, _ in CMAP.pairs]
    with capture(fresh, s_comps, detach=True) as cap:
        fresh(b.input_ids, b.attention_mask)
        s_feats = [select_rows(cap[s], b.attention_mask, "all") for s in s_comps]
    t_acts, _ = teacher_outputs(teacher, train, CMAP.teacher_components, "all", idx)
    t_feats = [select_rows(t_acts[t], b.attention_mask, "all") for _, t in CMAP.pairs]
    assert s_feats[0].shape[0] == int(b.attention_mask.sum())
    assert logged["align"] == pytest.approx(float(alignment_loss(s_feats, t_feats)), abs=1e-6)
    assert logged["step_seconds"] > 0
