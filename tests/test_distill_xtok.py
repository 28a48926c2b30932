"""Circuit distillation between models whose tokenizers differ (issue 15, item 3): the teacher reads its own
tokenization of the same prompts, the alignment uses the task's named positions (one row per prompt), the
teacher cache holds those rows, KD and teacher labels are refused, resume is exact, only the trainable
weights change; matching on each model's own tokens; the distill command across tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_distill import tiny_model
from circuit_distill.analysis import named_outputs, named_task_pair
from circuit_distill.distill.cache import TeacherCache
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.trainer import distill
from circuit_distill.errors import ConfigError
from circuit_distill.matching import ComponentMap, discover_and_match
from circuit_distill.model import Component, load_model
from circuit_distill.model.loading import resolve_name
from circuit_distill.model.tokenizer import SPECIAL_TOKENS
from circuit_distill.tasks import make_task
from circuit_distill.tasks.positions import position_names, task_positions
from conftest import interrupt_after_first_checkpoint
from test_compare_named import SPLIT, WORDS, _retokenised, wordpiece_tokenizer

H = Component.make_head
# student head -> teacher head (both 2 layers x 4 heads)
CMAP = ComponentMap([(H(0, 3), H(0, 1)), (H(1, 0), H(1, 2)), (H(1, 3), H(1, 0))])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def retok(tmp_path_factory):
    """The shipped teacher, the same teacher network behind a word-level tokenizer with other ids, and the
    shipped student's directory (on the teacher's tokenizer)."""
    root = tmp_path_factory.mktemp("xtok")
    teacher = load_model("builtin:entity-tracking-teacher", check=False)
    words = [w for w in teacher.tokenizer.get_vocab() if w not in SPECIAL_TOKENS]
    same = _retokenised(resolve_name("builtin:entity-tracking-teacher")[0], root / "t", words[::-1])
    return teacher, same, resolve_name("builtin:entity-tracking-student")[0]


@pytest.fixture(scope="module")
def wordpiece_pair(tmp_path_factory):
    """A tiny Llama teacher on the word-level tokenizer and a tiny GPT-2 student on a WordPiece tokenizer
    (``<bos>``, "Box" and "contains" in two pieces: other token counts and ids), as saved directories."""
    root = tmp_path_factory.mktemp("wp")
    t = tiny_model("llama", root / "t", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, words=WORDS, seed=1)
    s = tiny_model("gpt2", root / "s", n_layers=2, n_heads=4, d_model=32, tokenizer=wordpiece_tokenizer(WORDS, SPLIT),
                   seed=2)
    return t, s


def cfg(**kw):
    base = dict(objective="ce+align_cka", labels="gold", positions="object,query_label,last", steps=4, batch_size=8,
                lr=3e-3, eval_every=2, seed=0, use_cache=False, eval_batch_size=16)
    base.update(kw)
    return DistillConfig(**base)


def steps_of(res) -> list[dict]:
    return [r for r in res.history if not r.get("final")]


@pytest.mark.parametrize("positions", ["last", "object,query_label,last"])
def test_same_network_behind_another_tokenizer_trains_as_the_same_tokenizer(retok, positions):
    """Parity: the teacher behind a tokenizer with other ids gives the same losses, CKA and final weights
    as the same-tokenizer run, at one named position and at three (one row per prompt and position)."""
    teacher, same, student_dir = retok
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, same.tokenizer, 32, seed=0, n_boxes=3)
    held_t, held_s = named_task_pair("entity_tracking", teacher.tokenizer, same.tokenizer, 16, seed=9, n_boxes=3)
    assert not torch.equal(td.clean.input_ids, sd.clean.input_ids)
    c = cfg(positions=positions)
    a, b = load_model(student_dir, check=False), load_model(student_dir, check=False)
    ra = distill(a, td, teacher=teacher, eval_sets={"held": held_t}, component_map=CMAP, config=c, progress=False)
    rb = distill(b, td, teacher=same, teacher_data=sd, eval_sets={"held": held_t},
                 teacher_eval_sets={"held": held_s}, component_map=CMAP, config=c, progress=False)
    assert rb.manifest["across_tokenizers"] and not ra.manifest["across_tokenizers"]
    assert len(steps_of(ra)) == len(steps_of(rb)) == 4
    for x, y in zip(steps_of(ra), steps_of(rb)):
        for k in ("ce", "align", "cka", "total", "eval/pair_cka"):
            if k in x:
                assert y[k] == pytest.approx(x[k], abs=1e-5), (k, x, y)
    assert rb.pair_cka == pytest.approx(ra.pair_cka, abs=1e-5)
    for (_n, p1), (_, p2) in zip(a.hf.named_parameters(), b.hf.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-4, rtol=0)  # Adam turns float noise into ~1e-5


def test_cache_holds_the_teachers_rows_at_its_own_named_positions(wordpiece_pair, tmp_path):
    """Across token counts: the cache holds, per prompt, the teacher heads' outputs at the named positions of
    the teacher's own tokenization (concatenated), and a run from that cache needs no teacher at all."""
    t_dir, s_dir = wordpiece_pair
    teacher, student = load_model(t_dir, check=False), load_model(s_dir, check=False)
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, student.tokenizer, 24, seed=0, n_boxes=3)
    assert (sd.position("last") > td.position("last")).all()  # the student's tokens are more
    names = position_names("object,query_label,last")
    c = cfg(use_cache=True)
    distill(student, sd, teacher=teacher, teacher_data=td, component_map=CMAP, config=c, out_dir=tmp_path / "a",
            progress=False)
    cache = TeacherCache.load(tmp_path / "a" / "teacher_cache")
    want = named_outputs(teacher, td, CMAP.teacher_components, names)
    for comp in CMAP.teacher_components:
        rows, logits = cache.rows(torch.arange(len(td)), [comp])
        assert logits.shape == (24, 0)  # across tokenizers the teacher's logits are not kept
        assert rows[comp].shape == (24, 3 * teacher.arch.d_head)
        torch.testing.assert_close(rows[comp], want[comp].reshape(24, -1), atol=1e-5, rtol=0)
    again = load_model(s_dir, check=False)
    res = distill(again, sd, teacher=None, cache=cache, teacher_data=td, component_map=CMAP, config=c,
                  progress=False)
    first = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["total"] for r in steps_of(res)] == pytest.approx([r["total"] for r in first if not r.get("final")],
                                                                abs=1e-6)
    assert task_positions(sd, "object,last").shape == (24, 2)


@pytest.mark.parametrize("objective,kw,match", [
    ("kd", {}, "not defined across vocabularies"),
    ("kd+align_cka", {}, "not defined across vocabularies"),
    ("ce+iit", {}, "not defined across vocabularies"),
    ("ce+align_cka", {"labels": "teacher"}, "labels=gold"),
    ("ce+align_cka", {"positions": "all"}, "named positions"),
])
def test_what_needs_one_vocabulary_is_refused(wordpiece_pair, objective, kw, match):
    t_dir, s_dir = wordpiece_pair
    teacher, student = load_model(t_dir, check=False), load_model(s_dir, check=False)
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, student.tokenizer, 8, seed=0, n_boxes=3)
    with pytest.raises(ConfigError, match=match) as err:
        distill(student, sd, teacher=teacher, teacher_data=td, component_map=CMAP,
                config=cfg(objective=objective, **kw), progress=False)
    assert "\n" not in str(err.value)
    other = make_task("entity_tracking", teacher.tokenizer, 8, seed=5, n_boxes=3)
    with pytest.raises(ConfigError, match="prompt 0 differs"):
        distill(student, sd, teacher=teacher, teacher_data=other, component_map=CMAP, config=cfg(), progress=False)


def test_resume_is_exact_and_only_matched_heads_change(wordpiece_pair, tmp_path):
    t_dir, s_dir = wordpiece_pair
    teacher = load_model(t_dir, check=False)
    full, interrupted = load_model(s_dir, check=False), load_model(s_dir, check=False)
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, full.tokenizer, 24, seed=0, n_boxes=3)
    before = {k: v.detach().clone() for k, v in full.hf.named_parameters()}
    c = cfg(objective="ce+random_cka", steps=6, checkpoint_every=3, use_cache=True)
    distill(full, sd, teacher=teacher, teacher_data=td, component_map=CMAP, config=c, out_dir=tmp_path / "full",
            progress=False)
    changed = [k for k, v in full.hf.named_parameters() if not torch.equal(v, before[k])]
    # GPT-2: the matched heads' query columns of c_attn and their rows of c_proj; nothing else
    assert changed and all(k.endswith(("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight"))
                           for k in changed), changed
    w = dict(full.hf.named_parameters())["transformer.h.0.attn.c_proj.weight"]
    d = w.shape[0] // 4
    assert torch.equal(w[:d], before["transformer.h.0.attn.c_proj.weight"][:d])  # head 0 of layer 0 is not matched
    interrupt_after_first_checkpoint(
        lambda: distill(interrupted, sd, teacher=teacher, teacher_data=td, component_map=CMAP, config=c,
                        out_dir=tmp_path / "int", progress=False), tmp_path / "int")
    resumed = load_model(s_dir, check=False)
    res = distill(resumed, sd, teacher=teacher, teacher_data=td, component_map=CMAP, config=c,
                  out_dir=tmp_path / "int", progress=False, resume=True)
    assert res.steps == 6
    for (n, p1), (_, p2) in zip(full.hf.named_parameters(), resumed.hf.named_parameters()):
        assert torch.equal(p1, p2), n


def test_discover_and_match_on_each_models_own_tokens(retok, wordpiece_pair):
    """The same network behind two tokenizers: both circuits agree and every matcher, the similarity one
    (named-position rows) included, pairs each head with itself. Two different models: maps of the student's
    circuit onto the teacher's."""
    teacher, same, _ = retok
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, same.tokenizer, 16, seed=2, n_boxes=3)
    got = discover_and_match(teacher, same, td, student_data=sd, matchers=("ablation", "cka"), top_k=3)
    assert got.teacher.circuit.components == got.student.circuit.components
    for name in ("ablation", "cka"):
        assert all(s == t for s, t in got.maps[name].pairs), (name, got.maps[name].pairs)
    t, s = (load_model(d, check=False) for d in wordpiece_pair)
    td, sd = named_task_pair("entity_tracking", t.tokenizer, s.tokenizer, 8, seed=0, n_boxes=3)
    got = discover_and_match(t, s, td, student_data=sd, matchers=("ablation", "cka", "random"), top_k=2)
    for cm in got.maps.values():
        assert [p[0] for p in cm.pairs] == got.student.circuit.components
        assert {p[1] for p in cm.pairs} <= set(got.teacher.circuit.components)
    with pytest.raises(ConfigError, match="one shared tokenizer"):
        discover_and_match(t, s, td, matchers=("ablation",))


def test_cli_distill_across_tokenizers(wordpiece_pair, tmp_path, capsys):
    from circuit_distill.cli import main

    t_dir, s_dir = wordpiece_pair
    base = ["distill", "--teacher", str(t_dir), "--student", str(s_dir), "--task", "entity_tracking", "--quiet",
            "task_options.n_boxes=3", "n_train=16", "n_eval=8", "batch_size=8", "steps=2", "circuit_size=2",
            "labels=gold", "positions=object,last", "eval_every=0"]
    out = tmp_path / "run"
    assert main(base + ["objective=ce+align_cka", f"out_dir={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 2 and "held_out" in printed["final_eval"] and len(printed["final_eval"]) == 1
    man = json.loads((out / "manifest.json").read_text())
    assert man["across_tokenizers"] and len(ComponentMap.from_json(out / "component_map.json").pairs) == 2
    assert (out / "teacher_cache" / "index.json").is_file()
    assert main(base + ["objective=kd", f"out_dir={tmp_path / 'kd'}"]) == 2
    err = capsys.readouterr().err
    assert "not defined across vocabularies" in err and not (tmp_path / "kd" / "component_map.json").exists()


def test_xtok_protocol_runs_resumes_and_tabulates(wordpiece_pair, tmp_path, capsys):
    """The protocol command end to end on two tiny models with different tokenizers; a rerun after a lost
    result resumes from the run's checkpoint and leaves the other runs alone."""
    from circuit_distill.cli import main

    t_dir, s_dir = wordpiece_pair
    out = tmp_path / "xtok"
    args = ["xtok", "--out", str(out), f"teacher={t_dir}", f"student={s_dir}", "n_train=16", "n_eval=8",
            "n_discovery=8", "n_cka=8", "circuit_size=2", "steps=4", "batch_size=4", "checkpoint_every=2",
            "seeds=[0,1]", "positions=object,last", "eval_batch_size=8"]
    assert main(args + ["--max-runs", "2"]) == 0
    part = json.loads((out / "results.json").read_text())
    assert len(part["runs"]) == 2 and not part["complete"] and set(part["table"]) == {"ce", "ce+random_cka"}
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["runs"][:2] == part["runs"]
    assert set(res["table"]) == {"ce", "ce+random_cka", "ce+align_cka"} and len(res["runs"]) == 6
    cell = res["table"]["ce+align_cka"]["harder/accuracy"]
    assert len(cell["values"]) == 2 and cell["min"] <= cell["mean"] <= cell["max"]
    assert all(0 <= r["held_out_pair_cka"] <= 1 + 1e-6 for r in res["runs"])
    for r in res["runs"]:  # every row trains the matched student heads; only the random rows' pairs differ
        heads = [p[0] for p in r["pairs"]]
        assert heads == [str(s) for s, _ in ComponentMap.from_json(out / "map.json").pairs]
    assert "| ce+align_cka | 2 |" in (out / "results.md").read_text()
    assert not (out / "runs" / "ce.s0" / "student").exists() and (out / "runs" / "ce.s0" / "metrics.jsonl").is_file()
    disc = json.loads((out / "discovery.json").read_text())
    assert len(disc["teacher"]["circuit"]) == len(disc["student"]["circuit"]) == 2
    run = out / "runs" / "ce+align_cka.s1"
    before = json.loads((run / "result.json").read_text())
    (run / "result.json").unlink()
    other = (out / "runs" / "ce.s0" / "result.json").stat().st_mtime_ns
    assert main(args) == 0
    assert json.loads((run / "result.json").read_text())["final_eval"] == before["final_eval"]
    assert (out / "runs" / "ce.s0" / "result.json").stat().st_mtime_ns == other
    assert main(args[:-1] + ["eval_batch_size=4"]) == 2  # other settings: refused, nothing overwritten
    assert "other settings" in capsys.readouterr().err
    assert main(["xtok", "--out", str(tmp_path / "kd"), "rows=[kd]"]) == 2
    assert "not defined across vocabularies" in capsys.readouterr().err


def test_recipes_and_position_choices():
    from pathlib import Path

    from circuit_distill.config import load_config
    from circuit_distill.study.xtok import XtokConfig

    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in ("xtok-real.yaml", "xtok-gpu.yaml"):
        cfg = load_config(XtokConfig, configs / name)
        assert (cfg.teacher, cfg.student, cfg.rows) == ("gemma3-270m", "smollm2-135m",
                                                        ["ce", "ce+random_cka", "ce+align_cka"])
        assert len(cfg.seeds) >= 3 and cfg.steps >= 300 and cfg.n_eval >= 500
    for bad in ("positions=all", "rows=[ce,kd+align_cka]", "seeds=[]"):
        with pytest.raises(ConfigError):
            load_config(XtokConfig, configs / "xtok-real.yaml", [bad])
    assert position_names("object, last") == ["object", "last"] and position_names("all") == []
    for bad in ("object,,last", "last,last"):
        with pytest.raises(ConfigError, match="distinct names"):
            position_names(bad)
