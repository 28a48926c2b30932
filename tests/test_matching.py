"""Matching rules by hand: ablation (ties, many-to-one), hungarian, cka, random; JSON io and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuit_distill import Component
from circuit_distill.cli import main
from circuit_distill.errors import ConfigError
from circuit_distill.matching import (
    MATCHERS,
    METHODS,
    ComponentMap,
    Matcher,
    circuit_components,
    circuit_from_obj,
    effects_from_obj,
    match,
)

C = Component.parse

TEACHER = {"L0.H0": 0.10, "L0.H3": 0.50, "L1.H1": 0.30, "L2.H2": 0.30}
STUDENT = {"L0.H1": 0.45, "L1.H0": 0.12, "L1.H2": 0.31, "L1.H3": 0.0}


def _pairs(cmap):
    return [(str(s), str(t)) for s, t in cmap.pairs]


def test_ablation_rule_by_hand():
    cmap = match(TEACHER, STUDENT, list(TEACHER), list(STUDENT), "ablation")
    # L0.H1 0.45 -> 0.50 (L0.H3); L1.H0 0.12 -> 0.10 (L0.H0); L1.H2 0.31 -> tie 0.30 L1.H1 / L2.H2 -> L1.H1
    # (earliest in forward order); L1.H3 0.0 -> 0.10 (L0.H0): many-to-one
    assert _pairs(cmap) == [("L0.H1", "L0.H3"), ("L1.H0", "L0.H0"), ("L1.H2", "L1.H1"), ("L1.H3", "L0.H0")]
    assert cmap.distances == pytest.approx([0.05, 0.02, 0.01, 0.10])
    q = cmap.quality()
    assert q["n_teacher_distinct"] == 3 and q["max_teacher_reuse"] == 2 and q["n_ties"] == 1
    assert q["most_used_teacher"] == "L0.H0" and not q["degenerate"]
    assert q["teacher_uses"] == {"L0.H0": 2, "L0.H3": 1, "L1.H1": 1}
    assert cmap.student_components == [C("L0.H1"), C("L1.H0"), C("L1.H2"), C("L1.H3")]
    assert cmap.teacher_for("L1.H3") == C("L0.H0")


def test_tie_break_ignores_input_order():
    te = {"L3.H0": 0.2, "L1.H5": 0.4, "L0.H7": 0.2}
    cmap = match(te, {"L0.H0": 0.3}, list(te), ["L0.H0"], "ablation")  # 0.2 and 0.4 tie too (|0.1|)
    assert _pairs(cmap) == [("L0.H0", "L0.H7")]
    cmap = match(te, {"L0.H0": 0.2}, list(te)[::-1], ["L0.H0"], "ablation")
    assert _pairs(cmap) == [("L0.H0", "L0.H7")]


def test_degenerate_map_is_flagged():
    te = {"L0.H0": 0.0, "L1.H0": 0.6, "L1.H1": 0.4}
    se = {"L0.H0": 0.01, "L0.H1": 0.0, "L1.H0": 0.02}  # a weak student: every effect near zero
    cmap = match(te, se, list(te), list(se), "ablation")
    assert set(cmap.teacher_components) == {C("L0.H0")}
    assert cmap.quality()["degenerate"] and cmap.quality()["n_teacher_distinct"] == 1


def test_normalized_ablation_matching_by_hand():
    # the weak student of the degenerate case: scaled by each circuit's largest |dP| (0.6 and 0.02) the
    # effects become teacher {0, 1, 0.667} and student {0.5, 0, 1}
    te = {"L0.H0": 0.0, "L1.H0": 0.6, "L1.H1": 0.4}
    se = {"L0.H0": 0.01, "L0.H1": 0.0, "L1.H0": 0.02}
    cmap = match(te, se, list(te), list(se), "ablation", normalize=True)
    # 0.5 -> |0.5-0| = 0.5, |0.5-1| = 0.5, |0.5-0.667| = 0.167 -> L1.H1; 0 -> L0.H0; 1 -> L1.H0
    assert _pairs(cmap) == [("L0.H0", "L1.H1"), ("L0.H1", "L0.H0"), ("L1.H0", "L1.H0")]
    assert cmap.distances == pytest.approx([1 / 6, 0.0, 0.0])
    assert cmap.info["normalize"] == pytest.approx({"teacher": 0.6, "student": 0.02})
    assert not cmap.quality()["degenerate"]
    assert ComponentMap.from_dict(cmap.to_dict()).pairs == cmap.pairs
    with pytest.raises(ConfigError, match="normalize"):
        match(te, se, list(te), list(se), "cka", normalize=True, teacher_acts={}, student_acts={})
    with pytest.raises(ConfigError, match="non-zero effect"):
        match(te, {k: 0.0 for k in se}, list(te), list(se), "ablation", normalize=True)


def test_hungarian_one_to_one():
    te = {"L0.H0": 0.0, "L1.H0": 0.6, "L1.H1": 0.4}
    se = {"L0.H0": 0.01, "L0.H1": 0.0, "L1.H0": 0.02}
    cmap = match(te, se, list(te), list(se), "hungarian")
    assert len(set(cmap.teacher_components)) == 3  # one-to-one
    # by hand over the 6 permutations: L0.H1 (0.0) -> L0.H0 (0.0), the other two to 0.4 / 0.6 in either
    # order: total 0.97 both ways; every other permutation costs more (e.g. 0.01 + 0.40 + 0.58 = 0.99)
    assert sum(cmap.distances) == pytest.approx(0.97)
    assert cmap.teacher_for("L0.H1") == C("L0.H0")


def test_hungarian_more_students_than_teachers_is_balanced():
    te = {"L0.H0": 0.1, "L0.H1": 0.9}
    se = {"L0.H0": 0.1, "L0.H1": 0.11, "L0.H2": 0.12, "L0.H3": 0.8}
    cmap = match(te, se, list(te), list(se), "hungarian")
    uses = [cmap.teacher_components.count(C(t)) for t in te]
    assert uses == [2, 2]  # ceil(4 / 2) = 2 uses per teacher head at most; every student matched
    assert len(cmap) == 4 and cmap.info["max_uses_per_teacher"] == 2
    abl = match(te, se, list(te), list(se), "ablation")
    assert [cmap.teacher_components.count(C(t)) for t in te] != [abl.teacher_components.count(C(t)) for t in te]


def test_cka_matching():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(32, 8, generator=g) for _ in range(3)]
    teacher_acts = {"L0.H0": base[0], "L0.H1": base[1], "L1.H0": base[2]}
    rot = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    student_acts = {"L0.H0": base[2] @ rot, "L0.H1": 2 * base[0][:, :6], "L0.H2": base[2] + 1.0}
    cmap = match(None, None, list(teacher_acts), list(student_acts), "cka",
                 teacher_acts=teacher_acts, student_acts=student_acts)
    assert _pairs(cmap) == [("L0.H0", "L1.H0"), ("L0.H1", "L0.H0"), ("L0.H2", "L1.H0")]
    assert cmap.distances[0] == pytest.approx(0.0, abs=1e-6) and cmap.distances[2] == pytest.approx(0.0, abs=1e-6)
    assert 0 < cmap.distances[1] < 0.5
    with pytest.raises(ConfigError, match="teacher_acts"):
        match(None, None, list(teacher_acts), list(student_acts), "cka")


def test_random_is_seeded_and_reproducible():
    te = {f"L{i}.H{j}": 0.1 * i for i in range(3) for j in range(4)}
    se = {f"L0.H{j}": 0.0 for j in range(6)}
    a = match(te, se, list(te), list(se), "random", seed=3)
    b = match(te, se, list(te)[::-1], list(se), "random", seed=3)
    c = match(te, se, list(te), list(se), "random", seed=4)
    assert a.pairs == b.pairs  # circuits are sorted first: input order does not matter
    assert a.pairs != c.pairs
    assert all(t in {C(k) for k in te} for t in a.teacher_components)
    assert all(math.isfinite(d) for d in a.distances)  # effects given: distances known
    d = match(None, None, list(te), list(se), "random", seed=3)
    assert d.pairs == a.pairs and all(math.isnan(x) for x in d.distances)


# maps recorded from the if/elif ``match`` before it became a table of matchers (same example, same seed)
GOLD_TE = {"L0.H0": 0.30, "L0.H2": 0.05, "L1.H1": 0.20, "L2.H3": 0.20, "L3.H0": 0.60}
GOLD_SE = {"L0.H1": 0.02, "L0.H3": 0.06, "L1.H0": 0.04, "L1.H2": 0.01, "L2.H1": 0.05, "L2.H2": 0.0, "L3.H1": 0.03}
GOLD = {
    ("ablation", False): (["L0.H2"] * 7, [0.03, 0.01, 0.01, 0.04, 0.0, 0.05, 0.02], {"n_ties": 0}),
    ("ablation", True): (["L1.H1", "L3.H0", "L0.H0", "L0.H2", "L3.H0", "L0.H2", "L0.H0"],
                         [0.0, 0.0, 1 / 6, 1 / 12, 1 / 6, 1 / 12, 0.0], {"n_ties": 1}),
    ("hungarian", False): (["L0.H0", "L1.H1", "L1.H1", "L2.H3", "L0.H2", "L2.H3", "L0.H2"],
                           [0.28, 0.14, 0.16, 0.19, 0.0, 0.2, 0.02], {"max_uses_per_teacher": 2}),
    ("hungarian", True): (["L1.H1", "L3.H0", "L0.H0", "L0.H2", "L3.H0", "L0.H2", "L0.H0"],
                          [0.0, 0.0, 1 / 6, 1 / 12, 1 / 6, 1 / 12, 0.0], {"max_uses_per_teacher": 2}),
    ("random", False): (["L0.H2", "L1.H1", "L0.H0", "L2.H3", "L2.H3", "L0.H2", "L0.H0"],
                        [0.03, 0.14, 0.26, 0.19, 0.15, 0.05, 0.27], {}),
    ("random", True): (["L0.H2", "L1.H1", "L0.H0", "L2.H3", "L2.H3", "L0.H2", "L0.H0"],
                       [0.25, 2 / 3, 1 / 6, 1 / 6, 0.5, 1 / 12, 0.0], {}),
}


@pytest.mark.parametrize("method,normalize", list(GOLD))
def test_matcher_table_gives_the_recorded_maps(method, normalize):
    cmap = match(GOLD_TE, GOLD_SE, list(GOLD_TE), list(GOLD_SE), method, seed=4, normalize=normalize)
    teachers, distances, extra = GOLD[method, normalize]
    assert [str(s) for s in cmap.student_components] == list(GOLD_SE)
    assert [str(t) for t in cmap.teacher_components] == teachers
    assert cmap.distances == pytest.approx(distances, abs=1e-9)
    info = {"n_teacher_circuit": 5, "n_student_circuit": 7, **({"normalize": None} if normalize else {}), **extra}
    assert list(cmap.info) == list(info)  # the same keys in the same order (map JSON)
    if normalize:
        assert cmap.info.pop("normalize") == pytest.approx({"teacher": 0.6, "student": 0.06})
        info.pop("normalize")
    assert cmap.info == info


def test_cka_matcher_gives_the_recorded_map():
    g = torch.Generator().manual_seed(1)
    ta = {k: torch.randn(12, 4, generator=g) for k in GOLD_TE}
    sa = {k: ta[t] @ torch.randn(4, 3, generator=g) + 0.5 * torch.randn(12, 3, generator=g)
          for k, t in zip(GOLD_SE, list(GOLD_TE) * 2)}
    cmap = match(GOLD_TE, GOLD_SE, list(GOLD_TE), list(GOLD_SE), "cka", teacher_acts=ta, student_acts=sa)
    assert _pairs(cmap) == [("L0.H1", "L0.H0"), ("L0.H3", "L0.H2"), ("L1.H0", "L1.H1"), ("L1.H2", "L2.H3"),
                            ("L2.H1", "L3.H0"), ("L2.H2", "L0.H0"), ("L3.H1", "L0.H2")]
    assert cmap.distances == pytest.approx([0.354397, 0.369226, 0.35432, 0.298282, 0.209691, 0.446754, 0.20316],
                                           abs=1e-5)
    assert cmap.info["n_ties"] == 0
    assert cmap.info["effect_distance"] == pytest.approx([0.28, 0.01, 0.16, 0.19, 0.55, 0.3, 0.02])


def test_a_new_matcher_is_one_table_entry(monkeypatch):
    assert METHODS == tuple(MATCHERS) == ("ablation", "hungarian", "cka", "random")

    def last_teacher(problem):  # every student head to the latest teacher head, distance from the effects
        j = len(problem.teacher) - 1
        return [j] * len(problem.student), [row[j] for row in problem.distance]

    monkeypatch.setitem(MATCHERS, "last", Matcher(last_teacher, needs_effects=True, normalizable=False))
    cmap = match(TEACHER, STUDENT, list(TEACHER), list(STUDENT), "LAST")
    assert set(cmap.teacher_components) == {C("L2.H2")} and cmap.method == "last"
    assert cmap.distances == pytest.approx([0.15, 0.18, 0.01, 0.30])
    with pytest.raises(ConfigError, match="no ablation effect"):
        match(TEACHER, None, list(TEACHER), list(STUDENT), "last")
    with pytest.raises(ConfigError, match="normalize"):
        match(TEACHER, STUDENT, list(TEACHER), list(STUDENT), "last", normalize=True)


def test_circuit_components_reads_every_circuit_shape():
    want = [C("L0.H1"), C("L1.H2")]
    assert circuit_components(["L1.H2", "L0.H1", "L1.H2"]) == want  # sorted, no repeats
    assert circuit_components({"components": ["L1.H2", "L0.H1"]}) == want
    assert circuit_components({"L1.H2": 0.3, "L0.H1": 0.1}) == want
    assert circuit_components([{"component": "L1.H2"}, {"name": "L0.H1"}]) == want
    assert circuit_components("L1.H2") == [C("L1.H2")] and circuit_components(None) == []

    class Circuit:
        def components(self):
            return ["L1.H2", "L0.H1"]

    assert circuit_components(Circuit()) == want


def test_errors():
    with pytest.raises(ConfigError, match="unknown matching method"):
        match(TEACHER, STUDENT, list(TEACHER), list(STUDENT), "nearest")
    with pytest.raises(ConfigError, match="L5.H0"):
        match(TEACHER, STUDENT, list(TEACHER) + ["L5.H0"], list(STUDENT), "ablation")
    with pytest.raises(ConfigError, match="non-empty"):
        match(TEACHER, STUDENT, [], list(STUDENT))


def test_circuit_object_with_components_attribute():
    class Circuit:
        components = [C("L1.H1"), C("L0.H3")]

    cmap = match(TEACHER, STUDENT, Circuit(), ["L1.H0"], "ablation")
    assert _pairs(cmap) == [("L1.H0", "L1.H1")]  # 0.12 -> 0.30 beats 0.50; L0.H0 not in the circuit


def test_json_round_trip(tmp_path):
    cmap = match(TEACHER, STUDENT, list(TEACHER), list(STUDENT), "random", seed=7)
    path = cmap.to_json(tmp_path / "sub" / "map.json")
    back = ComponentMap.from_json(path)
    assert back.pairs == cmap.pairs and back.distances == pytest.approx(cmap.distances)
    assert back.method == "random" and back.seed == 7
    nan_map = ComponentMap([("L0.H0", "L1.H1")])
    assert json.loads(json.dumps(nan_map.to_dict()))["pairs"][0]["distance"] is None
    assert ComponentMap.from_dict({"L0.H0": "L1.H1"}).pairs == [(C("L0.H0"), C("L1.H1"))]
    with pytest.raises(ConfigError):
        ComponentMap.from_json(tmp_path / "missing.json")


def test_liberal_readers():
    assert effects_from_obj({"L0.H1": 0.5}) == {C("L0.H1"): 0.5}
    assert effects_from_obj({"L0.H1": {"p_correct": 0.5, "accuracy": 0.2}}, metric="accuracy") == {C("L0.H1"): 0.2}
    assert effects_from_obj({"effects": {"accuracy": {"L0.H1": 0.2}}}, metric="accuracy") == {C("L0.H1"): 0.2}
    rows = {"metric": "p_correct", "results": [{"component": "L0.H1", "effect": 0.3, "seconds": 2}]}
    assert effects_from_obj(rows) == {C("L0.H1"): 0.3}
    with pytest.raises(ConfigError, match="unrecognised"):
        effects_from_obj({"foo": 1})
    # the discovery sweep's to_dict: dP = clean - ablated (not the ablated value itself)
    sweep = {"clean": {"answer_prob": 0.8, "accuracy": 1.0},
             "ablated": {"L0.H1": {"answer_prob": 0.5, "accuracy": 0.75}, "L1.H0": {"answer_prob": 0.8, "accuracy": 1.0}},
             "method": "mean", "seconds": 1.0}
    assert effects_from_obj(sweep) == pytest.approx({C("L0.H1"): 0.3, C("L1.H0"): 0.0})
    assert effects_from_obj(sweep, metric="accuracy") == {C("L0.H1"): 0.25, C("L1.H0"): 0.0}
    with pytest.raises(ConfigError, match="answer_prob"):
        effects_from_obj(sweep, metric="logit_diff")
    assert circuit_from_obj({"components": ["L1.H2", "L0.H1"], "scores": {}}) == [C("L0.H1"), C("L1.H2")]
    assert circuit_from_obj(["L1.H2"]) == [C("L1.H2")]
    assert circuit_from_obj({"L1.H2": 0.3, "L0.H0": 0.1}) == [C("L0.H0"), C("L1.H2")]


def test_cli(tmp_path, capsys):
    (tmp_path / "te.json").write_text(json.dumps({"effects": TEACHER}))
    (tmp_path / "se.json").write_text(json.dumps(STUDENT))
    (tmp_path / "tc.json").write_text(json.dumps({"components": list(TEACHER)}))
    (tmp_path / "sc.json").write_text(json.dumps({"components": list(STUDENT)}))
    out = tmp_path / "map.json"
    rc = main(["match", "--teacher-effects", str(tmp_path / "te.json"), "--student-effects", str(tmp_path / "se.json"),
               "--teacher-circuit", str(tmp_path / "tc.json"), "--student-circuit", str(tmp_path / "sc.json"),
               "--method", "ablation", "--out", str(out)])
    assert rc == 0
    cmap = ComponentMap.from_json(out)
    assert _pairs(cmap) == [("L0.H1", "L0.H3"), ("L1.H0", "L0.H0"), ("L1.H2", "L1.H1"), ("L1.H3", "L0.H0")]
    assert "3 distinct teacher heads of 4" in capsys.readouterr().out
    rc = main(["match", "--teacher-effects", str(tmp_path / "te.json"), "--student-effects", str(tmp_path / "se.json"),
               "--method", "ablation", "--normalize", "--out", str(out)])
    assert rc == 0
    normed = ComponentMap.from_json(out)
    assert normed.info["normalize"] == pytest.approx({"teacher": max(TEACHER.values()),
                                                      "student": max(STUDENT.values())})
    assert normed.pairs == match(TEACHER, STUDENT, list(TEACHER), list(STUDENT), normalize=True).pairs
    capsys.readouterr()
    rc = main(["match", "--teacher-effects", str(tmp_path / "missing.json"), "--student-effects",
               str(tmp_path / "se.json"), "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_cka_with_activation_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"L0.H0": torch.randn(16, 4, generator=g), "L1.H1": torch.randn(16, 4, generator=g)}
    s = {"L0.H2": t["L1.H1"] * 2, "L1.H0": t["L0.H0"] + 0.01 * torch.randn(16, 4, generator=g)}
    torch.save(t, tmp_path / "t.pt")
    from safetensors.torch import save_file

    save_file(s, str(tmp_path / "s.safetensors"))
    (tmp_path / "tc.json").write_text(json.dumps(list(t)))
    (tmp_path / "sc.json").write_text(json.dumps({"components": list(s)}))
    rc = main(["match", "--method", "cka", "--teacher-acts", str(tmp_path / "t.pt"), "--student-acts",
               str(tmp_path / "s.safetensors"), "--teacher-circuit", str(tmp_path / "tc.json"),
               "--student-circuit", str(tmp_path / "sc.json"), "--out", str(tmp_path / "m.json")])
    assert rc == 0
    assert _pairs(ComponentMap.from_json(tmp_path / "m.json")) == [("L0.H2", "L1.H1"), ("L1.H0", "L0.H0")]
