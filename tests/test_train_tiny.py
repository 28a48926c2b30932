"""train-tiny: determinism from the seed, falling loss, resume, CLI; the shipped assets' accuracies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuit_distill.cli import main
from circuit_distill.errors import ConfigError
from circuit_distill.model import load_model
from circuit_distill.model.loading import ASSETS
from circuit_distill.tasks import evaluate, make_task
from circuit_distill.training.tiny import TinyTrainConfig, entity_tokenizer, sample_batch, train_tiny


def _mini(**kw) -> TinyTrainConfig:
    base = dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, min_boxes=2, max_boxes=3, batch_size=16,
                max_steps=30, eval_every=10, eval_n=20, target_boxes=[3], report_boxes=[3], report_n=20,
                checkpoint_every=10, warmup=5, lr=1e-2, seed=0, threads=1)
    base.update(kw)
    return TinyTrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_same_seed_same_weights_and_loss_falls(tmp_path):
    logs: list[str] = []
    rec_a = train_tiny(_mini(), tmp_path / "a", progress=False, log=logs.append)
    rec_b = train_tiny(_mini(), tmp_path / "b", progress=False, log=lambda m: None)
    train_tiny(_mini(seed=1), tmp_path / "c", progress=False, log=lambda m: None)
    wa, wb, wc = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert [h["loss"] for h in rec_a["history"]] == [h["loss"] for h in rec_b["history"]]
    # the loss on the answers falls from ~ln(vocab size 64) = 4.16
    first, last = rec_a["first_loss"], rec_a["history"][-1]["loss"]
    assert first > 3.8 and last < first - 0.5
    assert rec_a["steps"] == 30 and any("step 30" in m for m in logs)
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["config"]["seed"] == 0 and set(saved["final_accuracy"]) == {"3"}
    model = load_model(tmp_path / "a")  # loads like any HF checkpoint
    assert model.summary()["kv_heads"] == 2 and model.summary()["layers"] == 1


def test_resume_matches_uninterrupted(tmp_path):
    train_tiny(_mini(max_steps=30), tmp_path / "full", progress=False, log=lambda m: None)
    train_tiny(_mini(max_steps=20), tmp_path / "part", progress=False, log=lambda m: None)
    train_tiny(_mini(max_steps=30), tmp_path / "part", resume=True, progress=False, log=lambda m: None)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="different configuration"):
        train_tiny(_mini(max_steps=30, d_model=64), tmp_path / "part", resume=True, progress=False,
                   log=lambda m: None)


def test_training_batch_first_query_is_a_task_prompt():
    tok = entity_tokenizer()
    cfg = _mini(min_boxes=4, max_boxes=4, easy_fraction=0.0, n_queries=1)
    ids, mask, labels = sample_batch(cfg, tok, step=3)
    text = tok.decode(ids[0][mask[0].bool()].tolist())
    prompt = text.rsplit(" ", 1)[0]  # drop " <answer>." (the decoder glues punctuation on)
    data = make_task("entity_tracking", tok, 1, n_boxes=4)
    assert tok(prompt)["input_ids"] == ids[0][: len(tok(prompt)["input_ids"])].tolist()
    assert prompt.endswith("contains the") and data.prompts[0].endswith("contains the")
    (pos,) = (labels[0] != -100).nonzero()[:, 0].tolist()
    assert tok.convert_ids_to_tokens(int(ids[0, pos])) == "the"
    assert int(labels[0, pos]) == int(ids[0, pos + 1])  # the answer is the next token


def test_bad_config():
    with pytest.raises(ConfigError, match="max_boxes"):
        _mini(max_boxes=40).validate()
    with pytest.raises(ConfigError, match="n_kv_heads"):
        _mini(n_kv_heads=3).validate()


def test_cli(tmp_path, capsys):
    rc = main(["train-tiny", str(tmp_path / "m"), "--layers", "1", "--d-model", "32", "--boxes", "2-3",
               "--max-steps", "10", "--eval-every", "5", "--eval-n", "10", "--target-boxes", "3",
               "--report-boxes", "2,3", "--report-n", "10", "--batch-size", "8", "--threads", "1",
               "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 10 and set(out["final_accuracy"]) == {"2", "3"}


def _asset_record(name: str) -> dict:
    path = ASSETS / name / "training.json"
    if not path.is_file():
        pytest.skip(f"asset {name} not built")
    return json.loads(path.read_text())


def test_teacher_asset_accuracy():
    rec = _asset_record("entity-tracking-teacher")
    model = load_model("builtin:entity-tracking-teacher")
    data = make_task("entity_tracking", model, 300, seed=12345, n_boxes=7, n_reference=1)
    acc = evaluate(model, data)["accuracy"]
    recorded = rec["final_accuracy"]["7"]
    assert abs(acc - recorded) < 0.07  # a fresh sample agrees with the model card
    assert rec["reached_target"] and rec["config"]["target_accuracy"] >= 0.98
    assert acc >= 0.98, f"teacher 7-box accuracy {acc:.3f} below 0.98"


def test_student_asset_accuracy_in_band():
    rec = _asset_record("entity-tracking-student")
    model = load_model("builtin:entity-tracking-student")
    cfg = rec["config"]
    data = make_task("entity_tracking", model, 300, seed=12345, n_boxes=3, n_reference=1)
    acc = evaluate(model, data)["accuracy"]
    assert abs(acc - rec["final_accuracy"]["3"]) < 0.1
    assert rec["reached_target"]
    # partially competent: near its stopping target, far from solved, well above chance (1/3)
    assert cfg["target_accuracy"] - 0.1 <= acc <= cfg["target_accuracy"] + 0.15
    assert model.summary()["params"] < load_model("builtin:entity-tracking-teacher").summary()["params"]


def test_annealing_added_on_resume_equals_a_fresh_annealed_run(tmp_path):
    from circuit_distill.training.tiny import lr_factor

    cfg = _mini(max_steps=30, anneal_from=20)
    assert lr_factor(cfg, 19) == 1.0 and lr_factor(cfg, 25) == pytest.approx(0.5) and lr_factor(cfg, 30) == 0.0
    train_tiny(cfg, tmp_path / "fresh", progress=False, log=lambda m: None)
    train_tiny(_mini(max_steps=20), tmp_path / "part", progress=False, log=lambda m: None)
    train_tiny(cfg, tmp_path / "part", resume=True, progress=False, log=lambda m: None)
    a, b = _weights(tmp_path / "fresh"), _weights(tmp_path / "part")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # an annealing phase that would have started before the checkpoint changes the past: refused
    with pytest.raises(ConfigError, match="different configuration"):
        train_tiny(_mini(max_steps=40, anneal_from=10), tmp_path / "part", resume=True, progress=False,
                   log=lambda m: None)
    # ... and so does moving max_steps once the annealing is under way
    with pytest.raises(ConfigError, match="different configuration"):
        train_tiny(_mini(max_steps=40, anneal_from=20), tmp_path / "part", resume=True, progress=False,
                   log=lambda m: None)


def test_tiny_steps_alone_checkpoint_round_trip(tmp_path):
    """``tiny_step`` is the seeded step of ``train_tiny``; ``save_tiny_checkpoint`` /
    ``restore_tiny_checkpoint`` bring back the model, optimizer, schedule and run exactly."""
    from circuit_distill.training.tiny import (
        TinyRun,
        build_model,
        lr_factor,
        restore_tiny_checkpoint,
        save_tiny_checkpoint,
        tiny_step,
    )

    cfg, tok = _mini(), entity_tokenizer()

    def fresh():
        hf = build_model(cfg, tok)
        opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        return hf, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))

    hf, opt, sched = fresh()
    losses = [tiny_step(hf, opt, sched, cfg, tok, step).item() for step in range(3)]
    assert losses[-1] < losses[0]
    run = TinyRun(step=3, elapsed=1.5, history=[{"step": 3}], first_loss=round(losses[0], 5))
    save_tiny_checkpoint(tmp_path / "c.pt", hf, opt, sched, run, cfg)
    hf2, opt2, sched2 = fresh()
    assert restore_tiny_checkpoint(tmp_path / "c.pt", hf2, opt2, sched2, cfg) == run
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), hf2.state_dict().values()))
    assert sched2.state_dict() == sched.state_dict()
    # the next step is the same from the restored state
    assert tiny_step(hf, opt, sched, cfg, tok, 3).item() == tiny_step(hf2, opt2, sched2, cfg, tok, 3).item()
    assert restore_tiny_checkpoint(tmp_path / "c.pt", *fresh(), _mini(max_steps=99)).step == 3  # free to change
    with pytest.raises(ConfigError, match="different configuration"):
        restore_tiny_checkpoint(tmp_path / "c.pt", *fresh(), _mini(lr=0.5))
