"""The shipped recipes in configs/ load, and their keys are the options of the commands they feed."""

import argparse
from pathlib import Path

import pytest

from circuit_distill.cli import build_parser
from circuit_distill.commands.compare import apply_config
from circuit_distill.config import load_config
from circuit_distill.distill.config import DistillConfig
from circuit_distill.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_llama_recipe_is_a_valid_distill_config():
    cfg = load_config(DistillConfig, CONFIGS / "llama-3.1-8b_to_llama-3.2-1b_entity_tracking.yaml")
    assert cfg.teacher == "meta-llama/Llama-3.1-8B" and cfg.student == "meta-llama/Llama-3.2-1B"
    assert cfg.objective == "ce+align_cka" and cfg.trainable == "matched_heads" and cfg.dtype == "bfloat16"
    assert cfg.task == "entity_tracking" and cfg.positions == "all"
    over = load_config(DistillConfig, CONFIGS / "llama-3.1-8b_to_llama-3.2-1b_entity_tracking.yaml", ["teacher=/models/t", "steps=7"])
    assert over.teacher == "/models/t" and over.steps == 7


def _compare_args(argv):
    return build_parser().parse_args(["compare", *argv])


def test_compare_recipe_fills_options_and_cli_wins(tmp_path):
    args = _compare_args(["--config", str(CONFIGS / "gpt2_to_distilgpt2_compare.yaml"), "--student", "/m/s"])
    apply_config(args)
    assert args.teacher == "openai-community/gpt2" and args.student == "/m/s"
    assert args.task == "numerals" and args.n == 200 and args.out.startswith("runs/")


def test_compare_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: a\nstudnet: b\n")
    with pytest.raises(ConfigError, match="unknown key 'studnet'"):
        apply_config(_compare_args(["--config", str(bad)]))
    with pytest.raises(ConfigError, match="missing --student, --task, --out"):
        args = _compare_args(["--teacher", "a"])
        apply_config(args)
    assert isinstance(_compare_args([]), argparse.Namespace)
