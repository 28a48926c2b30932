"""Configs: the generic loader on a small dataclass, and DistillConfig (YAML round trip, overrides,
unknown keys, type errors)."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from circuit_distill.config import Config, config_from_yaml, config_help, config_to_yaml, load_config, option
from circuit_distill.distill.config import DistillConfig
from circuit_distill.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    c = DistillConfig(teacher="t", student="s", task="induction", task_options={"seq_len": 12}, lam=0.5,
                      positions="last", labels="gold", steps=10, out_dir=str(tmp_path / "o"))
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    assert load_config(DistillConfig, path) == c
    assert DistillConfig.from_yaml(c.to_yaml()) == c


def test_defaults():
    c = DistillConfig()
    assert c.lam == 1.0 and c.positions == "all" and c.labels == "teacher" and c.use_cache


def test_overrides_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: induction\nsteps: 5\n")
    c = load_config(DistillConfig, path, ["lr=3e-4", "steps=7", "use_cache=false", "task_options.seq_len=16", "lam=2",
                           "objective=CE + Align CKA", "component_map=null"])
    assert (c.lr, c.steps, c.use_cache, c.task_options, c.lam) == (3e-4, 7, False, {"seq_len": 16}, 2.0)
    assert isinstance(c.lam, float) and c.objective == "ce+align_cka" and c.component_map is None


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_key_names_key_and_valid_ones(tmp_path, where):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1\n" if where == "yaml" else "steps: 1\n")
    with pytest.raises(ConfigError, match="learning_rate.*valid keys:.*lr"):
        load_config(DistillConfig, path, [] if where == "yaml" else ["learning_rate=1"])


@pytest.mark.parametrize("bad", ["steps=abc", "use_cache=maybe", "lr=[1]", "labels=student", "objective=nope",
                                 "steps=0", "mixed_precision=fp8", "noequals"])
def test_bad_values(bad):
    with pytest.raises(ConfigError):
        load_config(DistillConfig, None, [bad])


@dataclass
class Small(Config):
    """A small config of every supported field type, for the generic loader."""

    label = "small setting"

    name: str = option("a", "a name")
    count: int = option(1, "how many")
    rate: float = option(0.5, "a rate")
    flag: bool = option(False, "a switch")
    limit: int | None = option(None, "an optional bound")
    sizes: list[int] = option(help="sizes", factory=lambda: [1, 2])
    opts: dict = option(help="free options", factory=dict)

    def validate(self) -> None:
        if self.count < 0:
            raise ConfigError(f"count must be >= 0, got {self.count}")


def test_generic_loader_coerces_by_field_type(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: 7\ncount: 3.0\nsizes: [4, 5.0]\n")
    s = load_config(Small, path, ["rate=2", "flag=yes", "limit=12", "opts.k.j=1", "count=4"], base={"name": "b"})
    assert (s.name, s.count, s.rate, s.flag, s.limit, s.sizes, s.opts) == ("7", 4, 2.0, True, 12, [4, 5], {"k": {"j": 1}})
    assert isinstance(s.rate, float) and isinstance(s.count, int) and all(type(x) is int for x in s.sizes)
    assert load_config(Small, None, ["limit=null"]).limit is None
    assert load_config(Small, base={"count": 9}).count == 9 and load_config(Small) == Small()
    assert config_from_yaml(Small, config_to_yaml(s)) == s and Small.from_dict(s.to_dict()) == s
    assert "count (int, default 1): how many" in config_help(Small)


def test_sub_key_override_keeps_the_rest_of_a_dict_field(tmp_path):
    """``opts.b=3`` changes one key of the dict field's default (or of the file's value), not the whole dict."""

    @dataclass
    class WithDict(Config):
        label: ClassVar[str] = "with-dict setting"
        opts: dict = option(help="named options", factory=lambda: {"a": 1, "nest": {"x": 1, "y": 2}})

    assert load_config(WithDict, None, ["opts.b=3"]).opts == {"a": 1, "nest": {"x": 1, "y": 2}, "b": 3}
    assert load_config(WithDict, None, ["opts.nest.y=5"]).opts == {"a": 1, "nest": {"x": 1, "y": 5}}
    assert WithDict().opts == {"a": 1, "nest": {"x": 1, "y": 2}}  # the default itself is not changed
    path = tmp_path / "w.yaml"
    path.write_text("opts: {c: 4}\n")
    assert load_config(WithDict, path, ["opts.d=5"]).opts == {"c": 4, "d": 5}


@pytest.mark.parametrize("override, message", [
    ("size=3", r"unknown small setting 'size'; valid keys: name, count, .*opts"),
    ("count=abc", r"small setting 'count' expects int, got 'abc' \(str\)"),
    ("rate=[1]", r"small setting 'rate' expects float"),
    ("flag=maybe", r"small setting 'flag' expects bool"),
    ("sizes=3", r"small setting 'sizes' expects list\[int\]"),
    ("sizes=[1, x]", r"small setting 'sizes' expects int, got 'x'"),
    ("count.x=1", r"small setting 'count' has no sub-keys \(only opts.NAME=VALUE does\)"),
    ("count", r"override 'count' is not key=value \(e.g. lr=1e-3\)"),
    ("count=-1", r"count must be >= 0"),
])
def test_generic_loader_errors_say_how_to_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Small, None, [override])


def test_generic_loader_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Small, tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping of key: value"):
        load_config(Small, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"unknown small setting\(s\) 'x'"):
        Small.from_dict({"x": 1})

