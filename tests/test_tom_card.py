"""The circuit section of a theory-of-mind model's card: story roles, attention per role, the card."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_distill.model import load_model
from circuit_distill.tasks import make_task
from circuit_distill.training.card import END, START, write_card
from circuit_distill.training.tiny import TinyTrainConfig, train_tiny
from circuit_distill.training.tom_card import (
    TOM_CATEGORIES,
    TOM_QUERIES,
    belief_attention,
    story_roles,
    tom_card_markdown,
    tom_circuit_card,
)


@pytest.fixture(scope="module")
def tom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tomcard") / "m"
    cfg = TinyTrainConfig(task="theory_of_mind", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, batch_size=8,
                          fillers=16, max_steps=10, eval_every=10, eval_n=10, report_n=10, checkpoint_every=10,
                          warmup=5, lr=1e-2, seed=0, threads=1)
    train_tiny(cfg, out, progress=False, log=lambda m: None)
    return out


def test_story_roles_name_every_role_where_the_generator_put_it(tom_dir):
    model = load_model(tom_dir)
    td = make_task("theory_of_mind", model, 30, seed=2, split="test")
    tok = model.tokenizer
    for i in range(len(td)):
        ids = td.clean.input_ids[i]
        cat, queries = story_roles(model, td, i, ids)
        role = lambda pos: TOM_CATEGORIES[int(cat[pos])]  # noqa: E731
        meta = td.metadata[i]
        assert role(int(td.positions["visibility"][i])) == "q_visibility"
        assert role(int(td.positions["new_drink"][i])) == "new_drink"
        assert role(int(td.positions["character_mention"][i])) == "q_name"
        assert role(int(td.positions["query_container"][i])) == "question"
        assert role(int(td.positions["container_mention"][i])) == ("q_container" if meta["own_container"]
                                                                   else "p_container")
        assert [TOM_CATEGORIES[int(c)] for c in cat].count("p_visibility") == 1
        q_drink = tok.convert_ids_to_tokens(int(ids[queries["q_drink"]]))
        if meta["case"] == "false_belief":
            assert q_drink == meta["belief"]  # Q's first drink is the false-belief answer
        assert q_drink in meta["drinks"] and role(queries["q_drink"]) == "q_drink"


def test_belief_attention_rows_sum_to_one(tom_dir):
    model = load_model(tom_dir)
    td = make_task("theory_of_mind", model, 10, seed=4, split="test")
    att = belief_attention(model, td, batch_size=3)
    for q in TOM_QUERIES:
        total = sum(torch.tensor(att[q][k]) for k in TOM_CATEGORIES)
        assert torch.allclose(total, torch.ones(2, 4), atol=1e-5)
    # by hand: L1.H0 from the last token onto the refill drink
    model.hf.set_attn_implementation("eager")
    a = model.hf(input_ids=td.clean.input_ids, attention_mask=td.clean.attention_mask,
                 output_attentions=True).attentions[1][:, 0]
    i = torch.arange(len(td))
    hand = a[i, td.positions["last"], td.positions["new_drink"]].mean().item()
    assert att["last"]["new_drink"][1][0] == pytest.approx(hand, abs=1e-5)


def test_tom_card_describes_every_head_and_is_written_in_place(tom_dir, tmp_path):
    model = load_model(tom_dir)
    card = tom_circuit_card(model, n=12, progress=False)
    assert {h["head"] for h in card["heads"]} == {f"L{i}.H{h}" for i in range(2) for h in range(4)}
    assert set(card["roles"]) == {"visibility", "false_belief_drink", "true_belief_drink", "order", "binding"}
    assert all(set(h["ablated_accuracy"]) == {"true_belief", "false_belief", "unknown"} for h in card["heads"])
    d = tmp_path / "m"
    d.mkdir()
    (d / "README.md").write_text("# A model\n")
    write_card(d, card, tom_card_markdown(card))
    write_card(d, card, tom_card_markdown(card))
    text = (d / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and "Reads the visibility sentence" in text
    assert json.loads((d / "circuit.json").read_text())["task"] == "theory_of_mind"


def test_model_card_cli_writes_the_theory_of_mind_card_of_the_task_in_training_json(tom_dir, tmp_path, capsys):
    from circuit_distill.cli import main

    assert main(["model-card", str(tom_dir), "--n", "9", "--out", str(tmp_path), "--no-progress"]) == 0
    card = json.loads((tmp_path / "circuit.json").read_text())
    assert card["task"] == "theory_of_mind" and card["n"] == 9
    assert "Reads the visibility sentence" in (tmp_path / "README.md").read_text()
    assert "Reads the visibility sentence" in capsys.readouterr().out
