"""Stages that use only the answer position unembed there only (the trainer's CE/KD/IIT, the teacher cache,
pair CKA, joint ablation, both sweep paths, activation reading) and give the numbers of the full-logits
path they replaced."""

from __future__ import annotations

import pytest
import torch

import circuit_distill.discovery.ablation as ablation_mod
import circuit_distill.discovery.replay as replay_mod
import circuit_distill.discovery.sweep as sweep_mod
import circuit_distill.distill.cache as cache_mod
import circuit_distill.distill.features as features_mod
import circuit_distill.distill.iit as iit_mod
import circuit_distill.distill.trainer as trainer_mod
from circuit_distill import load_model, tiny_model
from circuit_distill.discovery import ablate, ablation_sweep
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.trainer import distill
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, intervene
from circuit_distill.model.loading import position_ids_from_mask
from circuit_distill.model.logits import answer_logits, select_positions
from circuit_distill.tasks import make_task
from circuit_distill.tasks.base import Batch, TaskData

H = Component.make_head
CMAP = ComponentMap([(H(1, 0), H(2, 1)), (H(1, 2), H(1, 3))])
DISTILL_MODULES = (trainer_mod, cache_mod, iit_mod, features_mod)
DISCOVERY_MODULES = (ablation_mod, sweep_mod, replay_mod)


def full_then_select(model, input_ids, attention_mask, positions, *, module=None):
    """The path the stages ran before: the full ``[batch, seq, vocab]`` logits, then the rows at ``positions``."""
    if module is None:
        logits = model(input_ids, attention_mask, use_cache=False)
    else:
        logits = module(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask)).logits
    return select_positions(logits, positions)


class UnembedWidths:
    """Records the sequence width the output embedding of each model sees (1 = one position per row; the
    layer replay's ``[rows, d_model]`` counts 1)."""

    def __init__(self, *models):
        self.widths: list[int] = []
        self.handles = [m.hf.get_output_embeddings().register_forward_hook(
            lambda mod, args, out: self.widths.append(args[0].shape[1] if args[0].dim() == 3 else 1))
            for m in models]

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def pair_dirs(distill_pair_dirs):
    return distill_pair_dirs


@pytest.fixture(scope="module")
def data(pair_dirs):
    tok = load_model(pair_dirs[1], check=False).tokenizer
    return make_task("induction", tok, 32, seed=0, seq_len=10, segment_len=(2, 4))


def _run(pair_dirs, data, objective: str, monkeypatch, *, full: bool, **kw):
    teacher, student = (load_model(d, check=False) for d in pair_dirs)
    if full:
        for mod in DISTILL_MODULES:
            monkeypatch.setattr(mod, "answer_logits", full_then_select)
    widths = UnembedWidths(teacher, student)
    cfg = DistillConfig(objective=objective, steps=4, batch_size=8, lr=1e-2, eval_every=0, seed=0,
                        use_cache=False, **kw)
    try:
        res = distill(student, data, teacher=teacher, component_map=CMAP, config=cfg, progress=False,
                      eval_sets={"held": data})  # the end of the run: evaluate, pair CKA, IIA
    finally:
        widths.remove()
        monkeypatch.undo()
    return res, student, widths.widths


@pytest.mark.parametrize("objective,kw", [("ce+align_cka", {"labels": "teacher"}), ("kd+align_cka", {}),
                                          ("kd+iit", {"iit_base": "train"}), ("ce+iit", {"labels": "gold"})])
def test_trainer_equals_the_full_logits_step(pair_dirs, data, monkeypatch, objective, kw):
    old, old_student, old_widths = _run(pair_dirs, data, objective, monkeypatch, full=True, **kw)
    new, new_student, new_widths = _run(pair_dirs, data, objective, monkeypatch, full=False, **kw)
    assert max(old_widths) == data.clean.input_ids.shape[1]  # the reference really unembeds every position
    assert set(new_widths) == {1}  # teacher and student: one position per row, in every forward of the run
    steps_old = [r for r in old.history if "total" in r]
    steps_new = [r for r in new.history if "total" in r]
    assert len(steps_old) == len(steps_new) == 4
    for a, b in zip(steps_old, steps_new):
        for k in a:
            if k not in ("step_seconds", "lr", "step"):
                assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-5), (k, a, b)
    for (name, p_old), (_, p_new) in zip(old_student.hf.named_parameters(), new_student.hf.named_parameters()):
        torch.testing.assert_close(p_new, p_old, atol=1e-5, rtol=1e-5, msg=name)
    assert new.pair_cka == pytest.approx(old.pair_cka, abs=1e-6)


def _random_task(vocab: int, n: int = 6, seq: int = 9) -> TaskData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a right-padded row: its answer position is not the last column
    clean = Batch(ids * mask, mask)
    ref = Batch(torch.randint(4, vocab, (n, seq), generator=g), torch.ones_like(ids))
    answers = torch.randint(4, vocab, (n,), generator=g)
    return TaskData("random", clean, answers, torch.randint(4, vocab, (n,), generator=g), clean, ref,
                    {"last": clean.last})


@pytest.mark.parametrize("family,kw", [("gpt2", {}), ("gpt_neox", {}), ("llama", {"n_kv_heads": 2}),
                                       ("gemma2", {"n_kv_heads": 2})])
def test_discovery_equals_the_full_logits_path(tmp_path, monkeypatch, family, kw):
    m = load_model(tiny_model(family, tmp_path / family, seed=4, **kw))
    if family == "gemma2":
        m.hf.config.final_logit_softcapping = 0.05  # small enough to change the metrics of a tiny random model
    td = _random_task(len(m.tokenizer))
    comps = [H(0, 1), H(1, 2), Component(1, "mlp")]

    def measure():
        widths = UnembedWidths(m)
        try:
            out = (ablate(m, td, comps, method="mean"),
                   ablation_sweep(m, td, comps, method="mean", fast=False, progress=False),
                   ablation_sweep(m, td, comps, method="mean", fast=True, progress=False))
        finally:
            widths.remove()
        return out, widths.widths

    (joint, naive, fast), widths = measure()
    assert set(widths) == {1}
    for mod in DISCOVERY_MODULES:
        monkeypatch.setattr(mod, "answer_logits", full_then_select)
    (joint0, naive0, fast0), widths0 = measure()
    assert max(widths0) == td.clean.input_ids.shape[1]
    for k in joint0:
        assert joint[k] == pytest.approx(joint0[k], abs=1e-6)
    for new, old in ((naive, naive0), (fast, fast0), (fast, naive0)):
        for k in old.clean:
            assert new.clean[k] == pytest.approx(old.clean[k], abs=1e-6)
            for c in comps:
                assert new.ablated[c][k] == pytest.approx(old.ablated[c][k], abs=1e-5)


def test_answer_logits_inside_hooks_and_through_a_wrapper(tmp_path):
    """The first call on a fresh model may run inside ``intervene`` (the rows there are the caller's), and a
    wrapper that calls the model (as accelerate's prepared module does) still unembeds the positions only."""
    m = load_model(tiny_model("llama", tmp_path / "m", seed=5, n_kv_heads=2))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(m.tokenizer), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    pos = torch.tensor([6, 3, 4])
    repl = {H(0, 1): torch.randn(3, 7, m.arch.d_head, generator=g)}
    with torch.no_grad(), intervene(m, repl):
        got = answer_logits(m, ids, mask, pos)
        want = full_then_select(m, ids, mask, pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    widths = UnembedWidths(m)
    with torch.no_grad():
        got = answer_logits(m, ids, mask, pos, module=Wrapper(m.hf))
    widths.remove()
    assert widths.widths == [1]
    torch.testing.assert_close(got, full_then_select(m, ids, mask, pos, module=m.hf), atol=1e-6, rtol=1e-5)
