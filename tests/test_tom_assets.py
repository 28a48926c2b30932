"""The shipped theory-of-mind models: the teacher solves every case on unseen words, the warm student
sits in its stated competence band, and the teacher's card records a faithful circuit."""

from __future__ import annotations

import json

import pytest

from circuit_distill.model import load_model
from circuit_distill.model.loading import ASSETS
from circuit_distill.tasks import evaluate, make_task
from circuit_distill.tasks.theory_of_mind import CASES

SEED = 12_345  # none of the seeds used in training or in the cards


def _record(name: str) -> dict:
    path = ASSETS / name / "training.json"
    if not path.is_file():
        pytest.skip(f"asset {name} not built")
    return json.loads(path.read_text())


def _accuracy(model, case: str, n: int = 500) -> float:
    data = make_task("theory_of_mind", model, n, seed=SEED, cases=[case], split="test", n_reference=1)
    return evaluate(model, data)["accuracy"]


@pytest.fixture(scope="module")
def teacher():
    _record("tom-teacher")
    return load_model("builtin:tom-teacher")


@pytest.mark.parametrize("case", CASES)
def test_teacher_solves_each_case_on_unseen_words(teacher, case):
    rec = _record("tom-teacher")
    assert rec["config"]["task"] == "theory_of_mind" and rec["reached_target"]
    acc = _accuracy(teacher, case)
    assert acc >= 0.95, f"tom-teacher {case} accuracy {acc:.3f} on 500 test-split prompts, below 0.95"
    assert abs(acc - rec["final_accuracy"][case]) < 0.05  # a fresh sample agrees with the model card


def test_teacher_is_small(teacher):
    size = (ASSETS / "tom-teacher" / "model.safetensors").stat().st_size
    assert size < 4_000_000 and teacher.summary()["layers"] >= 2


def test_student_is_smaller_and_in_its_band(teacher):
    rec = _record("tom-student")
    student = load_model("builtin:tom-student")
    cfg = rec["config"]
    assert rec["reached_target"] and student.summary()["params"] < teacher.summary()["params"]
    assert student.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()  # one vocabulary: KD and CKA pairs
    acc = {c: _accuracy(student, c) for c in CASES}
    for c in cfg["target_cases"]:
        # partially competent: near its stopping target, far from solved
        assert cfg["target_accuracy"] - 0.1 <= acc[c] <= cfg["target_accuracy"] + 0.15, (c, acc)
    assert min(acc.values()) < 0.9  # room for distillation to help


def test_teacher_card_records_a_faithful_circuit():
    path = ASSETS / "tom-teacher" / "circuit.json"
    if not path.is_file():
        pytest.skip("tom-teacher has no circuit card yet")
    card = json.loads(path.read_text())
    assert card["task"] == "theory_of_mind" and card["circuit"] and card["faithfulness"] > 0.5
    assert set(card["roles"]) == {"visibility", "false_belief_drink", "true_belief_drink", "order", "binding"}
