"""The circuit section of a tiny model's card: attention categories, the section written in place,
and the shipped models' recorded circuits."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_distill.cli import main
from circuit_distill.model import load_model
from circuit_distill.model.loading import ASSETS
from circuit_distill.tasks import make_task
from circuit_distill.training.card import (
    CATEGORIES,
    END,
    START,
    attention_by_category,
    circuit_card,
    write_card,
)
from circuit_distill.training.tiny import TinyTrainConfig, train_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "m"
    cfg = TinyTrainConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, min_boxes=2, max_boxes=3, batch_size=16,
                          max_steps=20, eval_every=20, eval_n=20, target_boxes=[3], report_boxes=[3], report_n=20,
                          checkpoint_every=20, warmup=5, lr=1e-2, seed=0, threads=1)
    train_tiny(cfg, out, progress=False, log=lambda m: None)
    return out


def test_attention_categories_partition_each_row_and_match_a_hand_count(tiny_dir):
    model = load_model(tiny_dir)
    td = make_task("entity_tracking", model, 12, seed=3, n_boxes=3)
    att = attention_by_category(model, td, batch_size=5)  # several batches, right padding
    for q in ("last", "earlier_label"):
        total = sum(torch.tensor(att[q][k]) for k in CATEGORIES)
        assert torch.allclose(total, torch.ones(2, 4), atol=1e-5)
    # by hand for L1.H2: attention from the last token onto the answer object's position
    model.hf.set_attn_implementation("eager")
    out = model.hf(input_ids=td.clean.input_ids, attention_mask=td.clean.attention_mask, output_attentions=True)
    a = out.attentions[1][:, 2]  # [n, q, k]
    i = torch.arange(len(td))
    hand = a[i, td.positions["last"], td.positions["object"]].mean().item()
    assert att["last"]["answer_object"][1][2] == pytest.approx(hand, abs=1e-5)
    hand_q = a[i, td.positions["last"], td.positions["query_label"]].mean().item()
    assert att["last"]["query_label"][1][2] == pytest.approx(hand_q, abs=1e-5)


def test_write_card_replaces_its_section(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    card = circuit_card(model, boxes=3, n=40, progress=False)
    assert {h["head"] for h in card["heads"]} == {f"L{i}.H{h}" for i in range(2) for h in range(4)}
    assert set(card["circuit"]) == {h["head"] for h in card["heads"] if h["in_circuit"]}
    d = tmp_path / "m"
    d.mkdir()
    (d / "README.md").write_text("# A model\n\nintro\n")
    write_card(d, card)
    write_card(d, card | {"faithfulness": 0.123})
    text = (d / "README.md").read_text()
    assert text.startswith("# A model\n\nintro\n") and text.count(START) == 1 and text.count(END) == 1
    assert "0.12" in text
    assert json.loads((d / "circuit.json").read_text())["faithfulness"] == 0.123


def test_model_card_cli_needs_a_local_directory(capsys):
    assert main(["model-card", "gpt2-like-hub-id", "--no-progress"]) == 2
    assert "no such model directory 'gpt2-like-hub-id'" in capsys.readouterr().err
    assert main(["model-card", "some-org/some-model", "--no-progress"]) == 2
    assert "not a local model directory; pass --out DIR" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["entity-tracking-teacher", "entity-tracking-student"])
def test_shipped_cards_record_a_faithful_circuit(name):
    path = ASSETS / name / "circuit.json"
    if not path.is_file():
        pytest.skip(f"{name} has no circuit card yet")
    card = json.loads(path.read_text())
    assert card["circuit"] and card["faithfulness"] > 0.5
    # a fresh discovery on other prompts finds the same top head
    fresh = circuit_card(load_model(f"builtin:{name}"), boxes=card["boxes"], n=100, seed=card["seed"] + 1,
                         progress=False)
    assert fresh["heads"][0]["head"] == card["heads"][0]["head"]
