"""DistillConfig: YAML round trip, overrides, unknown keys, type errors."""

import pytest

from circuit_distill.config import DistillConfig, load_config
from circuit_distill.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    c = DistillConfig(teacher="t", student="s", task="induction", task_options={"seq_len": 12}, lam=0.5,
                      positions="last", labels="gold", steps=10, out_dir=str(tmp_path / "o"))
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    assert load_config(path) == c
    assert DistillConfig.from_yaml(c.to_yaml()) == c


def test_defaults():
    c = DistillConfig()
    assert c.lam == 1.0 and c.positions == "all" and c.labels == "teacher" and c.use_cache


def test_overrides_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: induction\nsteps: 5\n")
    c = load_config(path, ["lr=3e-4", "steps=7", "use_cache=false", "task_options.seq_len=16", "lam=2",
                           "objective=CE + Align CKA", "component_map=null"])
    assert (c.lr, c.steps, c.use_cache, c.task_options, c.lam) == (3e-4, 7, False, {"seq_len": 16}, 2.0)
    assert isinstance(c.lam, float) and c.objective == "ce+align_cka" and c.component_map is None


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_key_names_key_and_valid_ones(tmp_path, where):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1\n" if where == "yaml" else "steps: 1\n")
    with pytest.raises(ConfigError, match="learning_rate.*valid keys:.*lr"):
        load_config(path, [] if where == "yaml" else ["learning_rate=1"])


@pytest.mark.parametrize("bad", ["steps=abc", "use_cache=maybe", "lr=[1]", "labels=student", "objective=nope",
                                 "steps=0", "mixed_precision=fp8", "noequals"])
def test_bad_values(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])
