"""The controlled study (issue 17): its rows and grid, the controls it adds to the trainer (shuffled-example
targets, the untrained teacher), the transfer check, the paired bootstrap against a hand computation, and
the runner on a 2-cell grid with 2 seeds (results.json's shape, resume, settings refused)."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from circuit_distill import tiny_model
from circuit_distill.cli import main
from circuit_distill.distill import DistillConfig, build_cache, distill
from circuit_distill.distill.features import alignment_features, shuffled_partners, shuffled_targets
from circuit_distill.distill.losses import pair_ckas
from circuit_distill.distill.teacher import untrained_teacher
from circuit_distill.errors import ConfigError
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, capture, load_model
from circuit_distill.study import (
    CONTROLS,
    Roles,
    StudyConfig,
    finished,
    paired_gain,
    parse_row,
    role_similarity,
    study_cells,
    study_runs,
)
from circuit_distill.study import runner as study_runner
from circuit_distill.study.stats import resampled_means
from circuit_distill.tasks import make_task
from circuit_distill.tasks.positions import task_positions
from circuit_distill.training.tiny import entity_tokenizer

H = Component.make_head


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_models")
    tok = entity_tokenizer()
    t = tiny_model("llama", root / "teacher", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, tokenizer=tok, seed=3)
    s = tiny_model("llama", root / "student", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=4)
    return str(t), str(s)


@pytest.fixture(scope="module")
def models(pair):
    return load_model(pair[0], check=False), load_model(pair[1], check=False)


@pytest.fixture(scope="module")
def td(models):
    return make_task("entity_tracking", models[0].tokenizer, 24, seed=5, n_boxes="2-4")


# ---- rows and grid ---------------------------------------------------------------------------------

def test_rows_parse_and_controls_keep_the_papers_map():
    assert parse_row("ce").pairing == "-" and not parse_row("ce").aligns
    assert parse_row("ce+align_cka") == parse_row("ce+align_cka")
    hung = parse_row("ce+align_cka@hungarian")
    assert (hung.objective, hung.pairing, hung.map_key) == ("ce+align_cka", "hungarian", "hungarian")
    shuffled, untrained = parse_row("ce+shuffled_cka"), parse_row("ce+untrained_cka")
    assert (shuffled.objective, shuffled.align_targets, shuffled.map_key) == ("ce+align_cka", "shuffled", "ablation")
    assert (untrained.teacher, untrained.map_key) == ("untrained", "ablation")
    assert all(parse_row(name).is_control for name in CONTROLS.values())
    assert not parse_row("random_cka").is_control and not parse_row("ce+align_cka").is_control
    for bad, msg in (("ce+align_cka@nope", "unknown matcher"), ("ce@hungarian", "no alignment term"),
                     ("xyz", "unknown objective"), ("ce+random_cka@cka", "random pairs take no matcher")):
        with pytest.raises(ConfigError, match=msg):
            parse_row(bad)
    with pytest.raises(ConfigError, match="unknown trainable scope"):
        StudyConfig(trainable=["heads"])
    with pytest.raises(ConfigError, match="row_positions names rows not in rows"):
        StudyConfig(row_positions={"kd": ["all"]})


def test_grid_shares_rows_without_alignment_and_runs_seed_first():
    cfg = StudyConfig(students={"a": "x", "b": "y"}, trainable=["matched_heads", "all"], positions=["all", "last"],
                      rows=["ce", "kd", "ce+align_cka", "align_cka"], row_positions={"align_cka": ["all"]}, seeds=[0, 1])
    runs = study_runs(cfg)
    # per (warmth, scope, seed): ce and kd once (positions '-'), ce+align_cka at both positions, align_cka at 'all'
    assert len(runs) == 2 * 2 * 2 * (2 + 2 + 1) and len({r.id for r in runs}) == len(runs)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert {r.positions for r in runs if r.row in ("ce", "kd")} == {"-"}
    cells = study_cells(cfg)
    assert len(cells) == 8
    last = next(c for c in cells if c.positions == "last")
    assert last.run_of(cfg, "ce", 0).positions == "-" and last.run_of(cfg, "align_cka", 0) is None
    assert last.run_of(cfg, "ce+align_cka", 1).id == f"{last.warmth}.{last.trainable}.last.ce+align_cka.s1"


def test_warm_students_stand_at_three_competence_levels():
    """The study's warmth factor: one train-tiny trajectory stopped at acc@3 >= 0.33, 0.6 and 0.95."""
    from circuit_distill.tasks import evaluate

    accs = {}
    for name in ("student-cold", "student", "student-competent"):
        model = load_model(f"builtin:entity-tracking-{name}")
        td3 = make_task("entity_tracking", model.tokenizer, 300, seed=40_003, n_boxes=3)
        accs[name] = evaluate(model, td3)["accuracy"]
        cfg = json.loads(Path(model.hf.name_or_path, "training.json").read_text())
        assert cfg["config"]["seed"] == 1 and cfg["reached_target"]
    assert 0.25 < accs["student-cold"] < 0.45 < accs["student"] < 0.75 < 0.9 < accs["student-competent"]
    assert StudyConfig().students == {"cold": "builtin:entity-tracking-student-cold",
                                      "partial": "builtin:entity-tracking-student",
                                      "competent": "builtin:entity-tracking-student-competent"}


# ---- the controls in the trainer ----------------------------------------------------------------------

def test_shuffled_partners_never_pair_a_prompt_with_itself():
    lengths = [5, 5, 5, 3, 3, 4, 5, 3]
    mask = torch.zeros(len(lengths), 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    for seed in range(20):
        p = shuffled_partners(mask, seed)
        assert sorted(p[[0, 1, 2, 6]].tolist()) == [0, 1, 2, 6]  # a cycle through each length group
        for i, j in enumerate(p.tolist()):
            assert j != i
            if i != 5:  # the only prompt of length 4 takes any other prompt
                assert lengths[j] == lengths[i]
    assert torch.equal(shuffled_partners(mask, 3), shuffled_partners(mask, 3))
    assert len({tuple(shuffled_partners(mask, s).tolist()) for s in range(20)}) > 1


@pytest.mark.parametrize("positions", ["all", "last"])
def test_shuffled_targets_break_the_per_example_correspondence(models, td, positions):
    """Against a teacher identical to the student, paired rows give CKA 1 for every pair; the shuffled control
    (the same rows of other prompts) does not, though its rows are the very same set of activations."""
    student = models[1]
    heads = [H(0, 1), H(1, 2)]
    idx = torch.arange(12)
    b = td.clean.subset(idx)
    pos = task_positions(td, positions, idx)
    with capture(student, heads, detach=True) as cap:
        student(b.input_ids, b.attention_mask)
        acts = {h: cap[h].clone() for h in heads}
        pairs = [(h, h) for h in heads]
        paired = pair_ckas(*alignment_features(cap, acts, b.attention_mask, pos, pairs))
        shuffled_acts = shuffled_targets(acts, b.attention_mask, seed=0)
        shuffled = pair_ckas(*alignment_features(cap, shuffled_acts, b.attention_mask, pos, pairs))
    assert torch.allclose(paired, torch.ones(2), atol=1e-4)
    assert (shuffled < 0.95).all()
    partners = shuffled_partners(b.attention_mask, 0)
    for h in heads:  # prompt i's targets are prompt partners[i]'s activations
        assert torch.equal(shuffled_acts[h], acts[h][partners])


def test_trainer_aligns_with_shuffled_targets_when_asked(models, td):
    """Self-distillation for one step: the logged CKA of a paired run is 1, of a shuffled run below it."""
    student = models[1]
    cmap = ComponentMap([(H(0, 1), H(0, 1)), (H(1, 2), H(1, 2))])
    ckas = {}
    for targets in ("paired", "shuffled"):
        cfg = DistillConfig(objective="align_cka", steps=1, batch_size=12, lr=1e-6, eval_every=0, use_cache=False,
                            trainable="matched_heads", align_targets=targets, positions="all")
        s = dataclasses.replace(student, hf=copy.deepcopy(student.hf))
        res = distill(s, td, teacher=student, component_map=cmap, config=cfg, progress=False)
        ckas[targets] = res.history[0]["cka"]
    assert ckas["paired"] == pytest.approx(1.0, abs=1e-4) and ckas["shuffled"] < 0.95
    with pytest.raises(ConfigError, match="align_targets"):
        DistillConfig(align_targets="mixed")


def test_untrained_teacher_has_the_architecture_and_other_weights(models, td, tmp_path):
    teacher = models[0]
    state = torch.random.get_rng_state()
    fresh = untrained_teacher(teacher, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert fresh.components("head") == teacher.components("head") and fresh.n_params == teacher.n_params
    assert fresh.hf.config.to_dict() == teacher.hf.config.to_dict()
    p_fresh, p_teacher = dict(fresh.hf.named_parameters()), dict(teacher.hf.named_parameters())
    assert all(not torch.equal(p_fresh[k], v) for k, v in p_teacher.items() if v.dim() > 1)
    again = untrained_teacher(teacher, seed=7)
    assert all(torch.equal(v, dict(again.hf.named_parameters())[k]) for k, v in p_fresh.items())
    b = td.clean.subset(torch.arange(4))
    assert not torch.allclose(fresh(b.input_ids, b.attention_mask), teacher(b.input_ids, b.attention_mask))
    # the control's cache: the untrained teacher's activations, the trained teacher's logits
    heads = teacher.components("head")[:2]
    trained = build_cache(teacher, td, heads, "last", tmp_path / "t")
    mixed = build_cache(fresh, td, heads, "last", tmp_path / "u").with_logits_of(trained)
    acts, logits = mixed.rows(torch.arange(5))
    assert torch.equal(logits, trained.rows(torch.arange(5))[1])
    assert torch.equal(acts[heads[0]], build_cache(fresh, td, heads, "last", tmp_path / "u2").rows(torch.arange(5))[0][heads[0]])
    other = make_task("entity_tracking", teacher.tokenizer, 10, seed=6, n_boxes=3)
    with pytest.raises(ConfigError, match="same training rows"):
        mixed.with_logits_of(build_cache(teacher, other, heads, "last", tmp_path / "o"))


# ---- the transfer check and the statistics ------------------------------------------------------------

def test_role_similarity_by_hand():
    s, t = H(0, 0), H(1, 1)
    student = Roles({s: np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])}, {s: 30.0})
    teacher = Roles({t: np.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])}, {t: 80.0})
    out = role_similarity(student, teacher, [(s, t)])
    # total variation 0.5 at the first query token, 0 at the second: attention similarity 1 - 0.25
    assert out["attention"] == pytest.approx(0.75)
    assert out["effect"] == pytest.approx(1 - 50 / 100)
    assert out["role"] == pytest.approx((0.75 + 0.5) / 2)
    assert out["pairs"] == [{"student": "L0.H0", "teacher": "L1.H1", "attention": pytest.approx(0.75),
                             "effect": pytest.approx(0.5), "role": pytest.approx(0.625)}]


def test_resampled_means_by_hand():
    diff = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    seed_counts = np.array([[2, 0], [0, 2], [1, 1]], dtype=float)  # seeds {0,0}, {1,1}, {0,1}
    prompt_counts = np.array([[1, 1, 1], [0, 0, 3], [1, 2, 0]], dtype=float)  # {0,1,2}, {2,2,2}, {0,1,1}
    # resample 3: cells (0,0)=1, (0,1)=0 twice, (1,0)=0, (1,1)=1 twice -> 3 / 6
    assert resampled_means(diff, seed_counts, prompt_counts).tolist() == pytest.approx([1 / 3, 1.0, 0.5])


def test_paired_gain_equals_a_hand_computation():
    a = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0]])
    b = np.array([[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    g = paired_gain(a, b, n_boot=9, level=0.8, seed=3)
    # the same draws by hand: seeds then prompts, each resample a mean over the drawn grid
    rng = np.random.default_rng(3)
    s_idx, p_idx = rng.integers(0, 3, size=(9, 3)), rng.integers(0, 4, size=(9, 4))
    diff = a - b
    means = sorted(sum(diff[s, p] for s in s_idx[k] for p in p_idx[k]) / 12 for k in range(9))
    # percentiles with linear interpolation: position q * (n - 1) = 0.8 and 7.2 for q = 0.1, 0.9
    lo = means[0] + 0.8 * (means[1] - means[0])
    hi = means[7] + 0.2 * (means[8] - means[7])
    assert g.mean == pytest.approx(diff.mean()) == pytest.approx(4 / 12)
    assert (g.ci_low, g.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert (g.n_seeds, g.n_prompts) == (3, 4)
    same = paired_gain(np.ones((2, 5)), np.zeros((2, 5)), n_boot=50)
    assert (same.mean, same.ci_low, same.ci_high) == (1.0, 1.0, 1.0) and same.excludes_zero
    with pytest.raises(ConfigError, match="one shape"):
        paired_gain(np.ones((2, 5)), np.ones((2, 4)))


# ---- the runner ----------------------------------------------------------------------------------------

def grid(pair, **kw) -> dict:
    base = dict(teacher=pair[0], students={"warm": pair[1]}, trainable=["matched_heads"], positions=["all", "last"],
                rows=["ce", "ce+align_cka", "ce+shuffled_cka"], seeds=[0, 1], steps=2, batch_size=8, n_train=32,
                n_eval=20, n_curve=10, n_discovery=16, eval_every=1, circuit_top_k=2, train_boxes="2-3",
                eval_boxes=3, hard_boxes=4, n_boot=100)
    return {**base, **kw}


def synthetic_run(key, n=40) -> dict:
    """A run record as ``run_one`` writes it, with made-up numbers: the method gets the first 30 prompts right
    (role 0.8), ce and the controls the first 20 (role 0.6)."""
    good = key.row == "ce+align_cka"
    bits = "1" * (30 if good else 20) + "0" * (n - (30 if good else 20))
    return {**key.to_dict(), "id": key.id, "acc": bits.count("1") / n, "acc_hard": bits.count("1") / n,
            "correct_eval": bits, "correct_hard": bits, "curve": [{"step": 0, "acc": 0.1, "acc_hard": 0.1}],
            "steps_to": {"0.5": 0}, "trained_param_fraction": 0.1, "pair_cka_after": 0.5, "alignment_after": 0.5,
            "n_carry_80_after": 3, "n_over_20_after": 1, "seconds": 1.0,
            "role_after": {"role": 0.8 if good else 0.6 + 0.01 * key.seed, "attention": 0.5, "effect": 0.5}}


def test_runner_loop_skips_finished_and_claimed_runs_and_summarises(tmp_path, monkeypatch):
    """The loop alone (made-up runs): every run once, finished and claimed runs skipped, stale claims cleared,
    other settings refused; the summary's gains and verdicts follow the made-up numbers."""
    from circuit_distill.study.results import summarise_study

    cfg = StudyConfig(students={"w": "x"}, trainable=["matched_heads"], positions=["all", "last"], seeds=[0, 1, 2],
                      rows=["ce", "ce+align_cka", *CONTROLS.values()], n_boot=200)
    monkeypatch.setattr(study_runner, "StudyContext", lambda cfg, log: object())
    done = []
    monkeypatch.setattr(study_runner, "run_one", lambda ctx, key: done.append(key.id) or synthetic_run(key))
    out = tmp_path / "out"
    study_runner.prepare_out(out, cfg, overwrite=False)
    (out / "runs" / "w.matched_heads.all.ce+align_cka.s0.claim").touch()  # another process holds it
    assert study_runner.work(cfg, out) == 3 * 9 - 1 and len(done) == 26
    study_runner.prepare_out(out, cfg, overwrite=False)  # a rerun clears the stale claim ...
    done.clear()
    assert study_runner.work(cfg, out) == 1 and done == ["w.matched_heads.all.ce+align_cka.s0"]  # ... and runs only it
    assert study_runner.work(cfg, out) == 0
    with pytest.raises(ConfigError, match=r"other settings \(differs in: steps\)"):
        study_runner.prepare_out(out, StudyConfig(**{**cfg.to_dict(), "steps": 7}), overwrite=False)
    with pytest.raises(ConfigError, match=r"differs in: students.w"):
        study_runner.prepare_out(out, StudyConfig(**{**cfg.to_dict(), "students": {"w": "other"}}), overwrite=False)
    # the grid's extent may change: one more seed runs 9 more runs, fewer rows keep the runs on disk
    more = StudyConfig(**{**cfg.to_dict(), "seeds": [0, 1, 2, 3], "n_boot": 100})
    study_runner.prepare_out(out, more, overwrite=False)
    done.clear()
    assert study_runner.work(more, out) == 9 and all(i.endswith(".s3") for i in done)
    fewer = StudyConfig(**{**cfg.to_dict(), "rows": ["ce", "ce+align_cka"]})
    study_runner.prepare_out(out, fewer, overwrite=False)
    assert len(finished(out, fewer)) == 3 * 3 and len(finished(out)) == 4 * 9

    before = {"w": {"alignment": 0.5, "n_carry_80": 3, "n_over_20": 1,
                    "role@ablation": {"role": 0.6, "attention": 0.5, "effect": 0.5}}}
    cells = summarise_study(cfg, finished(out), before)
    assert len(cells) == 2 * 5  # 2 cells (positions all, last) x 5 rows; ce is shared by both cells
    method = next(c for c in cells if c["row"] == "ce+align_cka" and c["positions"] == "last")
    assert method["gain_vs_ce"]["mean"] == pytest.approx(0.25) and method["gain_vs_ce"]["ci_low"] > 0
    assert set(method["gain_vs_controls"]) == set(CONTROLS) and method["helps"] and method["transferred"]
    assert method["goal_met"] and method["gain_vs_best_control"]["mean"] == pytest.approx(0.25)
    assert method["role_gain_vs_controls"]["random"]["mean"] == pytest.approx(0.8 - 0.61)
    control = next(c for c in cells if c["row"] == "ce+shuffled_cka")
    assert control["helps"] is None and control["gain_vs_best_control"] is None
    assert control["gain_vs_ce"]["mean"] == 0


@pytest.mark.slow
def test_study_runs_a_two_cell_grid_and_resumes(pair, tmp_path, monkeypatch):
    import yaml

    cfg_path, out = tmp_path / "study.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(grid(pair)))
    assert main(["study", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_runs"] == res["n_runs_planned"] == 2 * (1 + 2 * 2)  # per seed: ce, 2 rows x 2 positions
    assert res["protocol"]["seeds"] == [0, 1] and res["protocol"]["n_eval"] == 20 and "decision_rule" in res["protocol"]
    assert {(c["positions"], c["row"]) for c in res["cells"]} == {
        (p, r) for p in ("all", "last") for r in ("ce", "ce+align_cka", "ce+shuffled_cka")}
    method = next(c for c in res["cells"] if c["row"] == "ce+align_cka" and c["positions"] == "all")
    for key in ("warmth", "trainable", "objective", "pairing", "seeds", "acc_mean", "acc_hard_mean", "gain_vs_ce",
                "gain_vs_best_control", "role_similarity_before", "role_similarity_after", "helps", "transferred"):
        assert key in method, key
    assert method["seeds"] == [0, 1] and method["gain_vs_best_control"]["control"] == "shuffled"
    assert set(method["gain_vs_ce"]) >= {"mean", "ci_low", "ci_high"} and method["gain_vs_ce"]["n_prompts"] == 20
    assert method["curve"]["steps"] == [0, 1, 2] and 0 < method["trained_param_fraction"] < 0.2
    assert 0 <= method["role_similarity_before"] <= 1 and not math.isnan(method["role_similarity_after"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "https://" not in html
    runs = finished(out)
    assert len(runs) == 10 and all(len(r["correct_hard"]) == 20 for r in runs.values())

    # a rerun trains nothing; a lost run (a kill before it was saved) is the only one trained again
    trained = []
    real = study_runner.run_one
    monkeypatch.setattr(study_runner, "run_one", lambda ctx, key: trained.append(key.id) or real(ctx, key))
    assert main(["study", str(cfg_path), "--out", str(out), "--quiet"]) == 0 and trained == []
    lost = next(iter(runs))
    (out / "runs" / f"{lost}.json").unlink()
    (out / "runs" / f"{lost}.claim").touch()  # the claim a killed run leaves
    assert main(["study", str(cfg_path), "--out", str(out), "--quiet"]) == 0 and trained == [lost]
    assert finished(out)[lost]["acc"] == runs[lost]["acc"]

    # other settings into a directory with runs are refused (one line, exit 2), the runs kept
    assert main(["study", str(cfg_path), "--out", str(out), "--quiet", "--set", "steps=3"]) == 2
    assert len(finished(out)) == 10
    study_runner.prepare_out(out, StudyConfig(**grid(pair, steps=3)), overwrite=True)
    assert finished(out) == {} and not (out / "results.json").exists()


@pytest.mark.slow
def test_study_with_every_control_in_two_worker_processes(pair, tmp_path):
    import yaml

    cfg_path, out = tmp_path / "study.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(grid(pair, positions=["all"], trainable=["matched_heads", "all"],
                                            rows=["ce", "kd", "ce+align_cka", *CONTROLS.values()])))
    assert main(["study", str(cfg_path), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_runs"] == res["n_runs_planned"] == 2 * 2 * 6
    method = [c for c in res["cells"] if c["row"] == "ce+align_cka"]
    assert len(method) == 2 and all(set(c["gain_vs_controls"]) == set(CONTROLS) for c in method)
    assert all(set(c["role_gain_vs_controls"]) == {"random", "shuffled"} for c in method)
    every = next(c for c in res["cells"] if c["trainable"] == "all" and c["row"] == "ce")
    assert every["trained_param_fraction"] == pytest.approx(1.0)
    assert not list((out / "runs").glob("*.claim"))


def test_study_command_refuses_bad_settings_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("rows: [ce, ce+align_cka@nope]\n")
    assert main(["study", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown matcher 'nope'" in err[0]
    cfg.write_text("steps: 0\n")
    assert main(["study", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_runs_saved_before_the_task_setting_existed_still_continue(tmp_path):
    from circuit_distill.study.config import StudyConfig
    from circuit_distill.study.runner import RUNS, SETTINGS, check_settings

    cfg = StudyConfig()
    (tmp_path / RUNS).mkdir()
    (tmp_path / RUNS / "a.json").write_text("{}")
    saved = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "task"}
    (tmp_path / SETTINGS).write_text(json.dumps(saved))
    assert check_settings(tmp_path, cfg)  # entity tracking, as those runs were
    tom = StudyConfig(task="theory_of_mind")
    with pytest.raises(ConfigError, match="differs in: task"):
        check_settings(tmp_path, tom)


def test_head_roles_on_theory_of_mind_read_the_story_roles():
    """The transfer check's attention profiles work on theory of mind (3 query tokens x 12 story roles, rows
    that sum to 1), and a model's heads are fully similar to themselves."""
    import numpy as np

    from circuit_distill.model import load_model
    from circuit_distill.study.transfer import Roles, attention_profiles, role_similarity
    from circuit_distill.tasks import make_task
    from circuit_distill.training.tom_card import TOM_CATEGORIES, TOM_QUERIES

    model = load_model("builtin:tom-teacher")
    td = make_task("theory_of_mind", model, 16, seed=3, split="test", n_reference=1)
    prof = attention_profiles(model, td)
    assert len(prof) == 12 and all(p.shape == (len(TOM_QUERIES), len(TOM_CATEGORIES)) for p in prof.values())
    assert np.allclose([p.sum(-1) for p in prof.values()], 1.0, atol=1e-3)
    roles = Roles(prof, {h: 10.0 for h in prof})
    heads = sorted(prof, key=str)
    same = role_similarity(roles, roles, list(zip(heads, heads)))
    other = role_similarity(roles, roles, list(zip(heads, heads[1:] + heads[:1])))
    assert same["attention"] == 1.0 and other["attention"] < 0.9
