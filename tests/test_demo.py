"""The demo pipeline end to end on stand-in models (random tiny teacher and student sharing the
entity-tracking tokenizer): every row runs, results.json has the promised shape, the report renders."""

import json

import pytest

from circuit_distill import tiny_model
from circuit_distill.config import load_config
from circuit_distill.demo import PAPER_ROWS, DemoConfig, run_demo
from circuit_distill.errors import ConfigError
from circuit_distill.model import Component
from circuit_distill.training.tiny import entity_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_models")
    tok = entity_tokenizer()
    t = tiny_model("llama", root / "teacher", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, tokenizer=tok, seed=3)
    s = tiny_model("llama", root / "student", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, tokenizer=tok, seed=4)
    return str(t), str(s)


def test_demo_end_to_end_on_stand_in_models(pair, tmp_path):
    cfg = DemoConfig(teacher=pair[0], student=pair[1], seeds=[0, 1], steps=4, batch_size=8, n_train=48, n_eval=24,
                     n_discovery=24, eval_every=2, circuit_top_k=2, train_boxes="2-3", eval_boxes=3, hard_boxes=4)
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
                     extra_matchers=[], train_kv=True)
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
                     extra_matchers=[])
    res = run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    assert res["teacher"]["acc"] >= 0.95 and res["teacher"]["acc_hard"] >= 0.9
    assert 1 / cfg.eval_boxes < res["student_before"]["acc"] < 0.8
    assert set(res["rows"]) == set(PAPER_ROWS)
    assert res["rows"]["ce+align_cka"]["trained_param_fraction"] < 0.2
