"""The study runner's interchange-intervention rows (issue 18): ``ce+iit``, its random-pairs control
``ce+random_iit``, the sanity rows and ``ce+iit+align_cka``; IIA of the paper's pairs before and after every
run and its gain over the control; and the runs of the studies made before them still recognised."""

import json
import shutil
from pathlib import Path

import pytest

from circuit_distill import tiny_model
from circuit_distill.cli import main
from circuit_distill.config import load_config
from circuit_distill.distill import DistillConfig
from circuit_distill.errors import ConfigError
from circuit_distill.study import CONTROLS, StudyConfig, finished, parse_row, study_cells, study_runs
from circuit_distill.study import runner as study_runner
from circuit_distill.study.grid import RunKey
from circuit_distill.study.results import summarise_study
from circuit_distill.training.tiny import entity_tokenizer

ROOT = Path(__file__).resolve().parents[1]
IIT_ROWS = ["ce", "ce+iit", "ce+random_iit", "ce+iit@self"]


def test_iit_rows_parse_with_their_controls():
    iit, rand, sanity, both = (parse_row(n) for n in ("ce+iit", "ce+random_iit", "ce+iit@self", "ce+iit+align_cka"))
    assert (iit.pairing, iit.map_key, iit.counterpart, iit.positioned, iit.aligns) == ("ablation", "ablation", None,
                                                                                       True, False)
    assert not iit.is_control and not both.is_control and rand.is_control and sanity.is_control
    assert rand.pairing == "random" and (sanity.objective, sanity.counterpart) == ("ce+iit", "self")
    assert parse_row("ce+iit@same_answer").counterpart == "same_answer"
    assert parse_row("ce+iit@hungarian").map_key == "hungarian"
    cfg = StudyConfig(rows=[*IIT_ROWS, "ce+iit+align_cka", *CONTROLS.values()])
    assert cfg.controls_of(iit) == {"random_iit": "ce+random_iit", "sanity_self": "ce+iit@self"}
    assert cfg.controls_of(both) == {**CONTROLS, "random_iit": "ce+random_iit"}  # (no sanity row of its objective)
    assert cfg.controls_of(parse_row("ce+align_cka")) == CONTROLS
    for bad, msg in (("ce+iit@bogus", "unknown matcher 'bogus'; choose from .* or a sanity source from self, "
                                      "same_answer"), ("ce+random_iit@self", "random pairs take no matcher"),
                     ("ce@self", "unknown matcher 'self'"), ("ce+iitt", "unknown objective")):
        with pytest.raises(ConfigError, match=msg):
            parse_row(bad)
    with pytest.raises(ConfigError, match="iit_pairs must be one of one, all"):
        StudyConfig(iit_pairs="two")


@pytest.mark.parametrize("text, msg", [("rows: [ce, ce+iit@bogus]\n", "unknown matcher 'bogus'"),
                                       ("rows: [ce, ce+random_iit@same_answer]\n", "random pairs take no matcher"),
                                       ("iit_loss: mse\n", "iit_loss must be one of kl, ce")])
def test_bad_iit_rows_and_settings_are_one_line(tmp_path, capsys, text, msg):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(text)
    assert main(["study", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "out").exists()


def test_iit_rows_run_at_the_cells_positions_with_the_studys_iit_settings():
    cfg = StudyConfig(students={"w": "x"}, trainable=["matched_heads"], positions=["all", "last"], seeds=[3],
                      rows=["ce", "ce+align_cka", "ce+iit", "ce+iit@self"], iit_pairs="all", iit_lam=0.5)
    ids = {k.id for k in study_runs(cfg)}
    assert ids == {"w.matched_heads.-.ce.s3"} | {f"w.matched_heads.{p}.{r}.s3" for p in ("all", "last")
                                                 for r in ("ce+align_cka", "ce+iit", "ce+iit@self")}
    last = next(c for c in study_cells(cfg) if c.positions == "last")
    dc = study_runner.distill_config(cfg, last.run_of(cfg, "ce+iit@self", 3))
    assert (dc.objective, dc.positions, dc.iit_positions, dc.iit_counterpart, dc.iit_pairs, dc.iit_lam) == (
        "ce+iit", "last", "last", "self", "all", 0.5)
    assert study_runner.distill_config(cfg, last.run_of(cfg, "ce+iit", 3)).iit_counterpart == "corrupted"
    # a row without interventions gets the trainer's IIT defaults, whatever the study's IIT settings
    for row in ("ce", "ce+align_cka"):
        dc = study_runner.distill_config(cfg, last.run_of(cfg, row, 3))
        assert {k: getattr(dc, k) for k in ("iit_counterpart", "iit_positions", "iit_pairs", "iit_lam")} == {
            k: getattr(DistillConfig(), k) for k in ("iit_counterpart", "iit_positions", "iit_pairs", "iit_lam")}


def test_runs_of_the_studies_before_the_iit_rows_are_still_finished(tmp_path):
    """The pilot's saved settings (without the IIT settings) still suit its config, and its run files still
    count as finished; the full study's grid still names the same 1080 runs."""
    pilot = load_config(StudyConfig, ROOT / "configs" / "study-pilot.yaml")
    out = tmp_path / "pilot"
    (out / "runs").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "study" / "pilot" / "study_config.json", out / "study_config.json")
    assert "iia" not in json.loads((out / "study_config.json").read_text())
    run = RunKey("partial", "matched_heads", "all", "ce+align_cka", 1)
    (out / "runs" / f"{run.id}.json").write_text(json.dumps({"id": run.id}))
    assert study_runner.check_settings(out, pilot) and run.id in finished(out, pilot)
    assert len(study_runs(pilot)) == 40
    study_runner.prepare_out(out, pilot, overwrite=False)
    assert run.id in finished(out, pilot)
    with pytest.raises(ConfigError, match=r"differs in: iia\)"):
        study_runner.check_settings(out, StudyConfig(**{**pilot.to_dict(), "iia": True}))
    full = load_config(StudyConfig, ROOT / "configs" / "study.yaml")
    ids = [k.id for k in study_runs(full)]
    assert len(ids) == len(set(ids)) == 1080 and "competent.all.query_label.ce+untrained_cka.s4" in ids
    assert "cold.matched_heads.-.kd.s0" in ids and not full.iia


def synthetic(key, n=40) -> dict:
    """A run record with made-up numbers: ce+iit gets 30 of 40 prompts right and IIA 0.9 (seed 0) / 0.8, every
    other row 20 and IIA 0.5; the warm student's IIA is 0.4."""
    good = key.row == "ce+iit"
    bits = "1" * (30 if good else 20) + "0" * (n - (30 if good else 20))
    return {**key.to_dict(), "id": key.id, "acc": bits.count("1") / n, "acc_hard": bits.count("1") / n,
            "correct_eval": bits, "correct_hard": bits, "curve": [{"step": 0, "acc": 0.1, "acc_hard": 0.1}],
            "steps_to": {"0.5": 0}, "trained_param_fraction": 0.1, "pair_cka_after": 0.5, "alignment_after": 0.5,
            "n_carry_80_after": 3, "n_over_20_after": 1, "seconds": 1.0,
            "role_after": {"role": 0.6, "attention": 0.5, "effect": 0.5},
            "iia_before": 0.4, "iia_after": (0.9 - 0.1 * key.seed) if good else 0.5}


@pytest.mark.parametrize("iia_margin, met", [(0.1, True), (0.4, False)])
def test_iit_gains_over_the_random_pairs_control_and_the_goal(iia_margin, met):
    cfg = StudyConfig(students={"w": "x"}, trainable=["matched_heads"], positions=["all"], seeds=[0, 1],
                      rows=IIT_ROWS, n_boot=200, iia=True, goal_iia_margin=iia_margin)
    runs = {k.id: synthetic(k) for k in study_runs(cfg)}
    before = {"w": {"alignment": 0.5, "n_carry_80": 3, "n_over_20": 1,
                    "role@ablation": {"role": 0.6, "attention": 0.5, "effect": 0.5}}}
    cells = {c["row"]: c for c in summarise_study(cfg, runs, before)}
    assert set(cells) == set(IIT_ROWS) and all(set(c) == set(cells["ce"]) for c in cells.values())
    iit = cells["ce+iit"]
    assert (iit["iia_before"], iit["iia_after"]) == (pytest.approx(0.4), pytest.approx(0.85))
    assert set(iit["gain_vs_controls"]) == {"random_iit", "sanity_self"}
    assert iit["gain_vs_controls"]["random_iit"]["mean"] == pytest.approx(0.25) and iit["helps"]
    iia_gain = iit["iia_gain_vs_controls"]["random_iit"]  # over seeds: 0.9 - 0.5 and 0.8 - 0.5
    assert iia_gain["mean"] == pytest.approx(0.35) and iia_gain["ci_low"] >= 0.3 - 1e-9
    assert iit["iia_gain_vs_ce"]["mean"] == pytest.approx(0.35) and not iit["transferred"]  # role did not rise
    assert iit["goal_met"] is met
    for control in ("ce+random_iit", "ce+iit@self"):
        assert cells[control]["control"] and cells[control]["goal_met"] is None
        assert cells[control]["iia_gain_vs_controls"] is None and cells[control]["iia_after"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_iit_models")
    tok = entity_tokenizer()
    t = tiny_model("llama", root / "teacher", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, tokenizer=tok, seed=3)
    s = tiny_model("llama", root / "student", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=4)
    return str(t), str(s)


def test_study_runs_iit_rows_and_logs_iia_before_and_after(pair, tmp_path):
    import yaml

    settings = dict(teacher=pair[0], students={"warm": pair[1]}, trainable=["matched_heads"], positions=["all"],
                    rows=IIT_ROWS, seeds=[0, 1], steps=2, batch_size=8, n_train=24, n_eval=16, n_curve=8,
                    n_discovery=12, eval_every=1, circuit_top_k=2, train_boxes="2-3", eval_boxes=3, hard_boxes=4,
                    n_boot=50, iia=True)
    cfg_path, out = tmp_path / "study.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(settings))
    assert main(["study", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    runs = finished(out)
    assert len(runs) == 2 * 4
    for r in runs.values():
        assert 0 <= r["iia_before"] <= 1 and 0 <= r["iia_after"] <= 1 and len(r["iia_pairs_after"]) == 2
        assert r["iia_before"] == pytest.approx(sum(r["iia_pairs_before"]) / 2)
        assert ("iia_own_after" in r) is (r["row"] != "ce")
    assert len({r["iia_before"] for r in runs.values()}) == 1  # every run starts from the same warm student
    assert {r["iit_counterpart"] for r in runs.values() if r["row"] != "ce"} == {"corrupted", "self"}
    res = json.loads((out / "results.json").read_text())
    assert "decision_rule_iit" in res["protocol"] and res["protocol"]["iia"] is True
    cells = {c["row"]: c for c in res["cells"]}
    iit = cells["ce+iit"]
    assert iit["positions"] == "all" and set(iit["gain_vs_controls"]) == {"random_iit", "sanity_self"}
    mean_after = sum(runs[f"warm.matched_heads.all.ce+iit.s{s}"]["iia_after"] for s in (0, 1)) / 2
    assert iit["iia_after"] == pytest.approx(mean_after)
    ctrl_after = sum(runs[f"warm.matched_heads.all.ce+random_iit.s{s}"]["iia_after"] for s in (0, 1)) / 2
    assert iit["iia_gain_vs_controls"]["random_iit"]["mean"] == pytest.approx(mean_after - ctrl_after)
    assert cells["ce+random_iit"]["control"] and cells["ce+random_iit"]["helps"] is None
    assert "IIA before → after" in (out / "report.html").read_text()
