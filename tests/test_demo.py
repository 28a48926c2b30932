"""The demo pipeline end to end on stand-in models (random tiny teacher and students sharing the
entity-tracking tokenizer): every row runs, results.json has the promised shape, the report renders, and
the map (a reduced grid of the study) runs, resumes and lands in results.json and report.html."""

import json

import pytest

from circuit_distill import tiny_model
from circuit_distill.config import load_config
from circuit_distill.demo import IIT_ROWS, PAPER_ROWS, DemoConfig, run_demo
from circuit_distill.demo.tables import format_table
from circuit_distill.errors import ConfigError
from circuit_distill.model import Component
from circuit_distill.training.tiny import entity_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_models")
    tok = entity_tokenizer()
    t = tiny_model("llama", root / "teacher", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, tokenizer=tok, seed=3)
    s = tiny_model("llama", root / "student", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=4)
    other = tiny_model("llama", root / "other", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=5)
    return str(t), str(s), str(other)  # teacher, student, a second student (the grid's other warmth level)


def test_demo_end_to_end_on_stand_in_models(pair, tmp_path):
    cfg = DemoConfig(teacher=pair[0], student=pair[1], seeds=[0, 1], steps=4, batch_size=8, n_train=48, n_eval=24,
                     n_discovery=24, eval_every=2, circuit_top_k=2, train_boxes="2-3", eval_boxes=3, hard_boxes=4,
                     grid=False)
    res = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["seeds"] == [0, 1] and on_disk["runtime_s"] > 0
    assert set(PAPER_ROWS) <= set(on_disk["rows"])
    assert set(on_disk["rows"]) - set(PAPER_ROWS) <= {"ce+align_cka@hungarian", "ce+align_cka@cka"}
    for name, row in on_disk["rows"].items():
        for key in ("acc_mean", "acc_std", "acc_hard_mean", "acc_hard_std", "trained_param_fraction",
                    "pair_cka_after", "alignment_after"):
            assert key in row, (name, key)
        assert 0 <= row["acc_mean"] <= 1 and len(row["acc_per_seed"]) == 2
    for key in ("acc", "acc_hard"):
        assert 0 <= on_disk["teacher"][key] <= 1 and 0 <= on_disk["student_before"][key] <= 1
    assert 0 <= on_disk["student_before"]["alignment"] <= 1
    # head-scoped rows train a small part of the student; the reference trains all of it
    assert on_disk["rows"]["ce@all"]["trained_param_fraction"] == pytest.approx(1.0)
    assert 0 < on_disk["rows"]["ce+align_cka"]["trained_param_fraction"] < 0.2
    assert res["rows"]["ce"]["curve_steps"][0] == 0
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "http://" not in html and "https://" not in html
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 2 * len(on_disk["rows"])


def test_demo_overrides_are_checked():
    cfg = load_config(DemoConfig, overrides=["lr=0.01", "steps=7"])
    assert cfg.lr == 0.01 and cfg.steps == 7
    with pytest.raises(ConfigError, match="unknown demo setting 'lr_max'"):
        load_config(DemoConfig, overrides=["lr_max=1"])
    with pytest.raises(ConfigError, match="expects int"):
        load_config(DemoConfig, overrides=["steps=abc"])
    assert load_config(DemoConfig, overrides=["extra_matchers=[ablation_norm]"]).extra_matchers == ["ablation_norm"]
    with pytest.raises(ConfigError, match="unknown demo matcher"):
        load_config(DemoConfig, overrides=["extra_matchers=[hungrian]"])
    assert load_config(DemoConfig, overrides=["circuit=pruned", "circuit_threshold=0.1"]).circuit == "pruned"
    with pytest.raises(ConfigError, match="circuit must be"):
        load_config(DemoConfig, overrides=["circuit=top4"])


def test_demo_train_kv_adds_the_mapped_heads_kv_groups(pair, tmp_path):
    """``--set train_kv=true``: each head-scoped row trains the q rows and o columns of its mapped heads
    plus the k and v rows of their GQA groups (counted by hand); ce@all is unchanged."""
    cfg = DemoConfig(teacher=pair[0], student=pair[1], seeds=[0], steps=2, batch_size=8, n_train=32, n_eval=16,
                     n_discovery=24, eval_every=0, circuit_top_k=2, train_boxes="2-3", eval_boxes=3, hard_boxes=4,
                     extra_matchers=[], train_kv=True, grid=False)
    res = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    d_model, n_heads, n_kv = 32, 4, 2
    d_head = d_model // n_heads
    student_heads = {Component.parse(p["student"]) for p in res["maps"]["ablation"]["pairs"]}
    groups = {(h.layer, h.head // (n_heads // n_kv)) for h in student_heads}
    expected = 2 * d_head * d_model * (len(student_heads) + len(groups))
    runs = json.loads((tmp_path / "runs.json").read_text())
    by_row = {r["row"]: r for r in runs}
    assert by_row["ce+align_cka"]["trained_params"] == expected
    assert by_row["ce@all"]["trained_param_fraction"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="trainable must be"):
        load_config(DemoConfig, overrides=["trainable=all"])


def test_demo_on_the_shipped_models_small_budget(tmp_path):
    """The default models (what ``make demo`` loads): the teacher solves the task at both box counts, the
    warm student is partly competent, and one short run per row completes."""
    cfg = DemoConfig(seeds=[0], steps=3, batch_size=8, n_train=64, n_eval=60, n_discovery=40, eval_every=0,
                     extra_matchers=[], grid=False)
    res = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert res["teacher"]["acc"] >= 0.95 and res["teacher"]["acc_hard"] >= 0.9
    assert 1 / cfg.eval_boxes < res["student_before"]["acc"] < 0.8
    assert set(res["rows"]) == set(PAPER_ROWS)
    assert res["rows"]["ce+align_cka"]["trained_param_fraction"] < 0.2


def small_cfg(pair, **kw) -> DemoConfig:
    base = dict(teacher=pair[0], student=pair[1], seeds=[0, 1], steps=3, batch_size=8, n_train=32, n_eval=16,
                n_discovery=24, eval_every=0, circuit_top_k=2, train_boxes="2-3", eval_boxes=3, hard_boxes=4,
                extra_matchers=[], grid=False, jobs=1)  # in this process: tests count calls and interrupt runs
    return DemoConfig(**{**base, **kw})


def test_demo_runs_in_worker_processes_give_the_same_records(pair, tmp_path):
    """``jobs=2`` (forked workers, one thread each) writes the same runs as ``jobs=1``, and the same table."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the workers'
    try:
        one = run_demo(small_cfg(pair), tmp_path / "one", progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    two = run_demo(small_cfg(pair, jobs=2), tmp_path / "two", progress=False, log=lambda *a: None)
    key = lambda r: (r["row"], r["seed"])  # noqa: E731  (workers finish in any order)
    runs = [sorted(json.loads((tmp_path / d / "runs.json").read_text()), key=key) for d in ("one", "two")]
    assert len(runs[1]) == 2 * len(two["rows"]) and runs[0] == runs[1]
    assert one["rows"] == two["rows"]
    assert (tmp_path / "two" / "comparison_after.json").exists()


def count_sweeps(monkeypatch) -> list[tuple]:
    """Record every ablation sweep as (model, prompts): wraps ``ablation_sweep`` in every module that holds it."""
    import sys

    from circuit_distill.discovery import sweep as sweep_module

    original = sweep_module.ablation_sweep
    calls: list[tuple] = []

    alive = []  # keep every swept model alive, so no two of them can share an id()

    def counted(model, task_data, *a, **kw):
        alive.append(model)
        calls.append((id(model.hf), hash(task_data.clean.input_ids.numpy().tobytes())))
        return original(model, task_data, *a, **kw)

    for name, mod in list(sys.modules.items()):
        if name.startswith("circuit_distill") and getattr(mod, "ablation_sweep", None) is original:
            monkeypatch.setattr(mod, "ablation_sweep", counted)
    return calls


def test_demo_sweeps_each_model_once_on_its_prompts(pair, tmp_path, monkeypatch):
    """Discovery, the circuit search and the comparison share one mean-ablation sweep per model: no
    (model, prompts) pair is swept twice. The teacher and the untrained student are swept once each,
    and each distilled student once (its comparison)."""
    calls = count_sweeps(monkeypatch)
    cfg = small_cfg(pair)
    res = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert len(calls) == len(set(calls)), "a model was swept twice on the same prompts"
    assert len(calls) == 2 + len(cfg.seeds) * len(res["rows"])


def test_demo_continues_after_an_interruption_without_redoing_runs(pair, tmp_path, monkeypatch):
    """A demo stopped after two runs and started again trains only the missing runs, and its runs equal
    those of an uninterrupted demo."""
    import circuit_distill.demo.run as demo_run

    cfg = small_cfg(pair)
    whole = run_demo(cfg, tmp_path / "whole", progress=False, log=lambda *a: None)
    original, trained = demo_run.run_row, []

    def stop_after_two(cfg, row, spec, seed, ctx):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append((row, seed))
        return original(cfg, row, spec, seed, ctx)

    monkeypatch.setattr(demo_run, "run_row", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_demo(cfg, tmp_path / "cut", progress=False, log=lambda *a: None)
    assert len(json.loads((tmp_path / "cut" / "runs.json").read_text())) == 2
    first = list(trained)
    trained.clear()
    monkeypatch.setattr(demo_run, "run_row", lambda *a: (trained.append(a[1:4:2]), original(*a))[1])
    resumed = run_demo(cfg, tmp_path / "cut", progress=False, log=lambda *a: None)
    total = len(cfg.seeds) * len(whole["rows"])
    assert len(trained) == total - 2 and not set(first) & set(trained)
    runs = json.loads((tmp_path / "cut" / "runs.json").read_text())
    key = lambda r: (r["row"], r["seed"])
    assert sorted(map(key, runs)) == sorted(map(key, json.loads((tmp_path / "whole" / "runs.json").read_text())))
    assert resumed["rows"] == whole["rows"]


def test_demo_refuses_other_settings_in_a_directory_with_runs(pair, tmp_path):
    cfg = small_cfg(pair, seeds=[0])
    run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    before = (tmp_path / "runs.json").read_text()
    with pytest.raises(ConfigError, match="differs in: steps.*--overwrite"):
        run_demo(small_cfg(pair, seeds=[0], steps=4), tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "runs.json").read_text() == before  # nothing lost
    res = run_demo(small_cfg(pair, seeds=[0], steps=4), tmp_path, progress=False, log=lambda *a: None, overwrite=True)
    assert all(len(r["acc_per_seed"]) == 1 for r in res["rows"].values())


def test_killed_demo_command_reruns_to_every_run_once(pair, tmp_path):
    """``circuit-distill demo`` killed (SIGKILL) once two runs are saved, then rerun with the same
    arguments: every run appears once, and the runs saved before the kill are kept as they were."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    args = [sys.executable, "-m", "circuit_distill.cli", "demo", "--out", str(out), "--seeds", "2", "--steps", "3",
            "--quiet"] + [f"--set={k}={v}" for k, v in dict(
                teacher=pair[0], student=pair[1], batch_size=8, n_train=32, n_eval=16, n_discovery=24, eval_every=0,
                circuit_top_k=2, train_boxes="2-3", eval_boxes=3, hard_boxes=4, extra_matchers="[]", grid="false").items()]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs_path, saved = out / "runs.json", []
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if runs_path.exists() and len(saved := json.loads(runs_path.read_text())) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    saved = json.loads(runs_path.read_text())  # a run may have been saved between the read and the kill
    assert 2 <= len(saved) < 12, "the demo was not killed part-way"
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing: {len(saved)} finished runs" in done.stdout + done.stderr
    runs = json.loads(runs_path.read_text())
    keys = [(r["row"], r["seed"]) for r in runs]
    assert len(keys) == len(set(keys)) == 12
    assert runs[:len(saved)] == saved


def test_demo_iit_rows_train_and_report_iia(pair, tmp_path):
    """``iit_rows=True`` adds the interchange-intervention rows (and the sanity row) beside the paper's, and
    measures the paper's pairs' IIA before distillation and after every run."""
    res = run_demo(small_cfg(pair, seeds=[0], iit_rows=True), tmp_path, progress=False, log=lambda *a: None)
    assert set(IIT_ROWS) <= set(res["rows"]) and set(PAPER_ROWS) <= set(res["rows"])
    assert 0 <= res["student_before"]["iia"] <= 1
    for name in IIT_ROWS:
        assert 0 <= res["rows"][name]["iia_after_mean"] <= 1
    assert res["rows"]["ce+iit"]["trained_param_fraction"] == res["rows"]["ce"]["trained_param_fraction"]


def test_runs_saved_before_a_setting_existed_continue_at_its_default(tmp_path):
    """Runs saved by a demo that did not know a newer setting count as that setting's default."""
    from circuit_distill.demo.run import RUNS, SETTINGS, finished_runs

    cfg = DemoConfig()
    old = cfg.to_dict()
    old.pop("iit_rows")
    (tmp_path / SETTINGS).write_text(json.dumps(old))
    (tmp_path / RUNS).write_text(json.dumps([{"row": "ce", "seed": 0}]))
    assert finished_runs(tmp_path, cfg) == [{"row": "ce", "seed": 0}]
    with pytest.raises(ConfigError, match="differs in: iit_rows"):
        finished_runs(tmp_path, DemoConfig(iit_rows=True))


# ---- the map: the demo's reduced grid of the study ---------------------------------------------------

ROW_KEYS = ("acc_mean", "acc_std", "acc_hard_mean", "acc_hard_std", "acc_per_seed", "acc_hard_per_seed",
            "trained_param_fraction", "pair_cka_after", "alignment_after", "curve_steps", "seeds")


def grid_cfg(pair, **kw) -> DemoConfig:
    """The tiny demo with a 2 warmth x 2 scope grid of ce / ce+random_cka / ce+align_cka, in this process."""
    return small_cfg(pair, **{"seeds": [0], "grid": True, "grid_students": {"cold": pair[2], "partial": pair[1]},
                              "grid_trainable": ["matched_heads", "all"], "grid_n_eval": 16, "grid_jobs": 1, **kw})


def test_demo_config_maps_its_protocol_onto_the_grid():
    cfg = load_config(DemoConfig, overrides=["steps=7", "lr=0.01", "positions=last", "grid_n_eval=300"],
                      base={"seeds": [0, 1, 2]})
    study = cfg.grid_config()
    assert (study.steps, study.lr, study.seeds, study.n_eval, study.n_train) == (7, 0.01, [0, 1, 2], 300, cfg.n_train)
    assert study.positions == ["last"] and study.trainable == ["matched_heads", "all"]
    assert study.rows == ["ce", "ce+random_cka", "ce+align_cka"]
    assert study.students == {"cold": "builtin:entity-tracking-student-cold", "partial": cfg.student}
    assert load_config(DemoConfig, overrides=["grid=false"]).grid is False
    more = load_config(DemoConfig, overrides=["grid_students={cold: builtin:entity-tracking-student-cold, "
                                              "competent: builtin:entity-tracking-student-competent}"])
    assert list(more.grid_config().students) == ["cold", "competent"]
    added = load_config(DemoConfig, overrides=["grid_students.competent=builtin:entity-tracking-student-competent"])
    assert list(added.grid_config().students) == ["cold", "partial", "competent"]  # a sub-key keeps the others
    for bad, msg in (("grid_trainable=[heads]", r"unknown grid_trainable scope\(s\) 'heads'"),
                     ("grid_rows=[ce, ce+align_cka@nope]", "unknown matcher 'nope'"),
                     ("grid_rows=[]", "grid_rows is empty"), ("grid_jobs=0", "grid_jobs must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            load_config(DemoConfig, overrides=[bad])


def test_demo_grid_writes_the_map_keeps_the_rows_and_resumes(pair, tmp_path, monkeypatch):
    """With the grid on, results.json keeps every row key of the demo and adds the grid's cells; the
    grid's (partial, matched_heads) cell is the demo's default cell (same runs, same accuracies); the
    report has the map's heatmaps; a rerun trains only what is missing, grid runs included."""
    import circuit_distill.demo.run as demo_run
    from circuit_distill.study import runner as study_runner

    cfg = grid_cfg(pair)
    res = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["rows"]) == set(PAPER_ROWS)
    assert all(key in row for row in on_disk["rows"].values() for key in ROW_KEYS)
    for key in ("teacher", "student_before", "circuits", "maps", "seeds", "config", "runtime_s"):
        assert key in on_disk, key
    grid = on_disk["grid"]
    assert grid["n_runs"] == grid["n_runs_planned"] == 2 * 2 * 3 and grid["n_eval"] == 16
    cells = {(c["warmth"], c["trainable"], c["row"]): c for c in grid["cells"]}
    assert set(cells) == {(w, s, r) for w in ("cold", "partial") for s in ("matched_heads", "all")
                          for r in ("ce", "ce+random_cka", "ce+align_cka")}
    for (w, s, r), c in cells.items():
        if r == "ce+align_cka":  # paired over one seed and the same prompts: the gains are differences of means
            assert c["gain_vs_ce"]["mean"] == pytest.approx(c["acc_hard_mean"] - cells[w, s, "ce"]["acc_hard_mean"])
            best = c["gain_vs_best_control"]
            assert best["control"] == "random" and best["mean"] == pytest.approx(
                c["acc_hard_mean"] - cells[w, s, "ce+random_cka"]["acc_hard_mean"])
            assert c["helps"] in (True, False)
    for r in ("ce", "ce+random_cka", "ce+align_cka"):  # the demo's default cell, trained by both runners alike
        assert cells["partial", "matched_heads", r]["acc_hard_mean"] == pytest.approx(res["rows"][r]["acc_hard_mean"])
    assert cells["cold", "all", "ce"]["trained_param_fraction"] == pytest.approx(1.0)
    page = (tmp_path / "report.html").read_text()
    assert "<h2>The map" in page and "<h3>ce+align_cka</h3>" in page and "<h3>Every cell and row</h3>" in page
    # the demo's 4 figures, 2 heatmap figures for ce+align_cka, 1 curve figure per warmth level
    assert page.count("data:image/png;base64,") >= 4 + 2 + 2 and "https://" not in page
    assert (tmp_path / "grid" / "results.json").exists() and (tmp_path / "grid" / "report.html").exists()

    trained, demo_trained = [], []
    real, real_row = study_runner.run_one, demo_run.run_row
    monkeypatch.setattr(study_runner, "run_one", lambda ctx, key: trained.append(key.id) or real(ctx, key))
    monkeypatch.setattr(demo_run, "run_row", lambda *a: demo_trained.append(a[1]) or real_row(*a))
    lost = sorted((tmp_path / "grid" / "runs").glob("*.json"))[0]
    lost.unlink()
    again = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert trained == [lost.stem] and demo_trained == []
    assert again["grid"]["cells"] == res["grid"]["cells"] and again["rows"] == res["rows"]

    # the grid's run settings are checked before anything trains; the demo's runs do not depend on them
    with pytest.raises(ConfigError, match="differs in: n_eval"):
        run_demo(grid_cfg(pair, grid_n_eval=20), tmp_path, progress=False, log=lambda *a: None)
    off = run_demo(grid_cfg(pair, grid=False), tmp_path, progress=False, log=lambda *a: None)
    assert "grid" not in off and off["rows"] == res["rows"] and demo_trained == [] and trained == [lost.stem]
    assert "The map" not in (tmp_path / "report.html").read_text()


def test_demo_on_theory_of_mind_reports_accuracy_per_case(tmp_path):
    from circuit_distill.tasks.theory_of_mind import CASES
    from circuit_distill.training.curricula import curriculum_for
    from circuit_distill.training.tiny import TinyTrainConfig

    tok = curriculum_for("theory_of_mind").tokenizer(TinyTrainConfig(task="theory_of_mind", fillers=4))
    t = tiny_model("llama", tmp_path / "t", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=3)
    s = tiny_model("llama", tmp_path / "s", n_layers=1, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=4)
    cfg = DemoConfig(task="theory_of_mind", teacher=str(t), student=str(s), seeds=[0], steps=2, batch_size=4,
                     n_train=16, n_eval=12, n_discovery=12, eval_every=1, circuit_top_k=2, grid=False,
                     extra_matchers=[])
    data = cfg.make_data(tok)
    assert {d.metadata[0]["case"] for d in (data["true_belief"], data["false_belief"], data["unknown"])} == set(CASES)
    assert {m["case"] for m in data["hard"].metadata} == {"false_belief"}
    assert data["train"].options["split"] == "train" and data["eval"].options["split"] == "test"
    res = run_demo(cfg, tmp_path / "out", progress=False, log=lambda *a: None)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["task"] == "theory_of_mind" and set(PAPER_ROWS) == set(on_disk["rows"])
    for side in ("teacher", "student_before"):
        assert all(0 <= on_disk[side][f"acc_{c}"] <= 1 for c in CASES)
    for name, row in on_disk["rows"].items():
        assert all(len(row[f"acc_{c}_per_seed"]) == 1 for c in CASES), name
    table = format_table(res["rows"]).splitlines()
    assert table[0].endswith("true belief  false belief  unknown")
    assert "false belief" in (tmp_path / "out" / "report.html").read_text()
    with pytest.raises(ConfigError, match="task must be one of"):
        DemoConfig(task="ioi")
