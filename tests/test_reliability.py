"""Reliability (issue 13): no code runs from a received checkpoint, divergence stops a run with nothing
non-finite on disk, no rerun destroys a run, and every predictable mistake is one line on stderr with
exit code 2, raised before any model work. Each CLI case asserts the exit code, the one line and that
nothing on disk was lost."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuit_distill.cli import main
from circuit_distill.config import load_config
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.state import DivergenceError, read_checkpoint, write_checkpoint
from circuit_distill.errors import ConfigError
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, load_model, tiny_model
from circuit_distill.tasks import make_task
from circuit_distill.training.tiny import TinyTrainConfig

CMAP = ComponentMap([(Component.make_head(1, 0), Component.make_head(2, 1)),
                     (Component.make_head(1, 2), Component.make_head(1, 3))])
TINY = ["--layers", "1", "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--boxes", "2-3", "--max-steps", "4",
        "--eval-every", "2", "--eval-n", "8", "--target-boxes", "3", "--report-boxes", "3", "--report-n", "8",
        "--batch-size", "8", "--warmup", "2", "--checkpoint-every", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Tiny teacher and student directories, their component map and a distill config (no discovery)."""
    root = tmp_path_factory.mktemp("rel")
    t = tiny_model("llama", root / "teacher", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=1)
    s = tiny_model("llama", root / "student", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=2)
    CMAP.to_json(root / "cmap.json")
    (root / "c.yaml").write_text(
        f"teacher: {t}\nstudent: {s}\ntask: induction\ntask_options: {{seq_len: 10, segment_len: [2, 4]}}\n"
        f"n_train: 32\nn_eval: 16\nsteps: 4\nbatch_size: 8\neval_every: 0\ncheckpoint_every: 2\n"
        f"component_map: {root / 'cmap.json'}\nuse_cache: false\n")
    return {"root": root, "yaml": root / "c.yaml", "teacher": t, "student": s}


def distill_args(setup, out: Path, *extra: str) -> list[str]:
    return ["distill", "--config", str(setup["yaml"]), f"out_dir={out}", "--quiet", *extra]


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["train-tiny", str(out), *TINY, *extra]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``circuit-distill argv`` (in process)."""
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str) -> str:
    """The single ``error: ...`` line of a run that failed with exit code 2."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (what must not be lost)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def all_finite(ckpt: Path, key: str) -> bool:
    saved = torch.load(ckpt, weights_only=True)
    return all(bool(torch.isfinite(v).all()) for v in saved[key].values())


@pytest.fixture(scope="module")
def distill_run(setup, tmp_path_factory) -> Path:
    """A finished 4-step distill run (checkpoint at step 4)."""
    out = tmp_path_factory.mktemp("distill_run") / "run"
    assert main(distill_args(setup, out)) == 0
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 4-step train-tiny run (model and checkpoint in the same directory)."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    assert main(tiny_args(out)) == 0
    return out


def command_args(kind, setup, out, *extra):
    return distill_args(setup, out, *extra) if kind == "distill" else tiny_args(out, *extra)


# --- 1. no code runs from a received checkpoint ---------------------------------------------------


class Payload:
    """Unpickling this creates the file ``marker`` (what a crafted checkpoint could do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(out: Path, marker: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"params": {}, "model": {}, "step": Payload(marker)}, out / "checkpoint.pt")
    return out / "checkpoint.pt"


@pytest.mark.parametrize("kind", ["distill", "train-tiny"])
def test_crafted_checkpoint_runs_nothing(kind, setup, tmp_path, capsys):
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    ckpt = crafted_checkpoint(out, marker)
    before = snapshot(out)
    line = one_line(*run_cli(capsys, command_args(kind, setup, out, "--resume")))
    assert "could run code" in line and str(ckpt) in line
    assert not marker.exists() and snapshot(out) == before
    # the file is a real threat: an unsafe load runs it
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint_in_a_subprocess(tmp_path):
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    crafted_checkpoint(out, marker)
    r = subprocess.run([sys.executable, "-m", "circuit_distill.cli", *tiny_args(out, "--resume")],
                       capture_output=True, text=True, timeout=300)
    one_line(r.returncode, r.stderr)
    assert "could run code" in r.stderr and not marker.exists()


@pytest.mark.parametrize("kind", ["distill", "train-tiny"])
def test_truncated_checkpoint_is_one_line(kind, setup, distill_run, tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(distill_run if kind == "distill" else tiny_run, out)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = snapshot(out)
    line = one_line(*run_cli(capsys, command_args(kind, setup, out, "--resume")))
    assert "truncated or corrupt" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_checkpoint_with_nonfinite_weights_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    saved = read_checkpoint(out / "checkpoint.pt", ["model"])
    next(iter(saved["model"].values())).fill_(float("nan"))
    torch.save(saved, out / "checkpoint.pt")
    before = snapshot(out)
    line = one_line(*run_cli(capsys, tiny_args(out, "--resume", "--max-steps", "6")))
    assert "non-finite weights" in line and snapshot(out) == before


# --- 2. divergence is caught; nothing non-finite is written ---------------------------------------


def test_lr_1e6_is_refused_before_any_model_work(setup, tmp_path, capsys):
    out = tmp_path / "d"
    for lr in ("1e6", "-1e-3", "0", ".nan"):
        # a missing teacher proves it: the config error comes before any model is loaded
        line = one_line(*run_cli(capsys, distill_args(setup, out, f"lr={lr}", "teacher=/no/such/model")))
        assert "lr must be in (0, 1]" in line
    line = one_line(*run_cli(capsys, tiny_args(tmp_path / "t", "--lr", "1e6")))
    assert "lr must be in (0, 1]" in line
    assert not out.exists() and not (tmp_path / "t").exists()


def test_float16_divergence_stops_with_one_line(setup, tmp_path, capsys):
    """Real divergence (float16 weights, lr 1): stopped at the step it happens, with precision advice that
    fits (no mixed_precision='no' when it is already off), and no non-finite weights on disk."""
    out = tmp_path / "d"
    line = one_line(*run_cli(capsys, distill_args(setup, out, "dtype=float16", "lr=1", "checkpoint_every=1")))
    assert "diverged at step 1" in line and "lower lr (now 1)" in line and "float16" in line
    assert "mixed_precision" not in line and "no checkpoint was written" in line
    assert not (out / "checkpoint.pt").exists() and not (out / "student").exists()


def poison(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")


def test_distill_divergence_keeps_the_last_good_checkpoint(setup, tmp_path, capsys, monkeypatch):
    import circuit_distill.distill.trainer as tr

    real, calls = tr.train_micro_batch, []

    def micro_batch_then_nan_at_step_3(state, *a, **k):
        parts = real(state, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            poison(state.trainable.parameters()[0])
        return parts

    monkeypatch.setattr(tr, "train_micro_batch", micro_batch_then_nan_at_step_3)
    out = tmp_path / "d"
    line = one_line(*run_cli(capsys, distill_args(setup, out, "steps=6")))
    assert "diverged at step 3" in line and "lower lr" in line and "warmup" in line
    assert f"the last good checkpoint is {out / 'checkpoint.pt'}" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert all_finite(out / "checkpoint.pt", "params") and not (out / "student").exists()


def test_train_tiny_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import circuit_distill.training.tiny as tiny

    real = tiny.tiny_step

    def step_then_nan_at_step_3(hf, opt, sched, cfg, tokenizer, step):
        loss = real(hf, opt, sched, cfg, tokenizer, step)
        if step == 2:  # the third step
            poison(next(hf.parameters()))
        return loss

    monkeypatch.setattr(tiny, "tiny_step", step_then_nan_at_step_3)
    out = tmp_path / "t"
    line = one_line(*run_cli(capsys, tiny_args(out)))
    assert "diverged at step 3" in line and f"the last good checkpoint is {out / 'checkpoint.pt'}" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert all_finite(out / "checkpoint.pt", "model") and not (out / "model.safetensors").exists()


def test_nonfinite_loss_names_no_checkpoint_that_does_not_exist(setup, monkeypatch):
    import circuit_distill.distill.trainer as tr

    real = tr.objective_loss

    def nan_loss(*a, **k):
        total, parts = real(*a, **k)
        return total * math.nan, parts

    monkeypatch.setattr(tr, "objective_loss", nan_loss)
    student, teacher = load_model(setup["student"], check=False), load_model(setup["teacher"], check=False)
    train = make_task("induction", student.tokenizer, 16, seed=0, seq_len=10, segment_len=(2, 4))
    with pytest.raises(tr.NonFiniteLossError) as e:
        tr.distill(student, train, teacher=teacher, component_map=CMAP, progress=False,
                   config=DistillConfig(steps=2, batch_size=8, eval_every=0, use_cache=False))
    msg = str(e.value)
    assert "step 1" in msg and "no checkpoint was written" in msg and "mixed_precision" not in msg
    assert "\n" not in msg


def test_write_checkpoint_refuses_nonfinite_weights(tmp_path):
    path = tmp_path / "c.pt"
    write_checkpoint(path, {"w": torch.ones(3)}, [("w", torch.ones(3))])
    before = path.read_bytes()
    with pytest.raises(DivergenceError, match="refusing to write.*NaN/inf.*w"):
        write_checkpoint(path, {"w": torch.tensor([1.0, math.inf])}, [("w", torch.tensor([1.0, math.inf]))])
    assert path.read_bytes() == before and not (tmp_path / "c.pt.tmp").exists()


# --- 3. no rerun destroys a run -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["distill", "train-tiny"])
def test_rerun_without_resume_refuses_then_overwrite_starts_again(kind, setup, distill_run, tiny_run, tmp_path,
                                                                  capsys):
    out = tmp_path / "run"
    shutil.copytree(distill_run if kind == "distill" else tiny_run, out)
    before = snapshot(out)
    line = one_line(*run_cli(capsys, command_args(kind, setup, out)))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before
    line = one_line(*run_cli(capsys, command_args(kind, setup, out, "--resume", "--overwrite")))
    assert "only one of them" in line and snapshot(out) == before
    rc, err = run_cli(capsys, command_args(kind, setup, out, "--overwrite"))
    assert rc == 0, err
    if kind == "distill":
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in metrics] == [1, 2, 3, 4, 4]
    else:
        assert json.loads((out / "training.json").read_text())["steps"] == 4


@pytest.mark.parametrize("kind", ["distill", "train-tiny"])
def test_resume_without_checkpoint_says_so(kind, setup, tmp_path, capsys):
    out = tmp_path / "fresh"
    line = one_line(*run_cli(capsys, command_args(kind, setup, out, "--resume")))
    assert f"no checkpoint at {out / 'checkpoint.pt'}" in line and "without --resume" in line
    assert snapshot(out) == {}


def test_python_api_refuses_too(setup, distill_run, tmp_path):
    from circuit_distill.distill.trainer import distill
    from circuit_distill.training.tiny import train_tiny

    out = tmp_path / "run"
    shutil.copytree(distill_run, out)
    student = load_model(setup["student"], check=False)
    train = make_task("induction", student.tokenizer, 32, seed=0, seq_len=10, segment_len=(2, 4))
    before = snapshot(out)
    with pytest.raises(ConfigError, match="already holds a run"):
        distill(student, train, component_map=CMAP, out_dir=out, progress=False,
                config=DistillConfig(objective="ce", labels="gold", trainable="attention", steps=1, batch_size=8))
    with pytest.raises(ConfigError, match="already holds a run"):
        train_tiny(TinyTrainConfig(n_layers=1, d_model=32, target_boxes=[3], report_boxes=[3]), out,
                   checkpoint_dir=out, progress=False)
    assert snapshot(out) == before


# --- 4. predictable mistakes: one line, exit 2, before any model work -----------------------------


def test_batch_size_larger_than_the_training_set_is_an_error(setup, tmp_path, capsys):
    out = tmp_path / "d"
    line = one_line(*run_cli(capsys, distill_args(setup, out, "batch_size=64", "teacher=/no/such/model")))
    assert "batch_size=64 is larger than the 32 training examples" in line and not out.exists()
    from circuit_distill.distill.trainer import distill

    student = load_model(setup["student"], check=False)
    train = make_task("induction", student.tokenizer, 16, seed=0, seq_len=10, segment_len=(2, 4))
    with pytest.raises(ConfigError, match="larger than the 16 training examples"):
        distill(student, train, component_map=CMAP, progress=False,
                config=DistillConfig(objective="ce", labels="gold", steps=1, batch_size=32))


@pytest.mark.parametrize("override, message", [
    ("weight_decay=-1", "weight_decay must be a finite number >= 0"), ("temperature=.inf", "temperature"),
    ("seed=-1", "seed must be in"), ("trainable=heads", "trainable must be one of"),
    ("matching=cka", "matching must be one of"), ("eval_batch_size=0", "eval_batch_size must be >= 1"),
    ("lr=1" + "0" * 400, "config key 'lr' expects float"),
])
def test_bad_numbers_are_one_line_before_any_model_work(setup, tmp_path, capsys, override, message):
    line = one_line(*run_cli(capsys, distill_args(setup, tmp_path / "d", override, "teacher=/no/such/model")))
    assert message in line and not (tmp_path / "d").exists()


def test_train_tiny_bad_settings_are_one_line(tmp_path, capsys):
    for extra, message in ((["--kv-heads", "0"], "n_kv_heads must be >= 1"), (["--boxes", "7-2"], "min_boxes"),
                           (["--target-boxes", "30"], "target_boxes"), (["--warmup", "-5"], "warmup")):
        assert message in one_line(*run_cli(capsys, tiny_args(tmp_path / "t", *extra)))
    assert not (tmp_path / "t").exists()


# --- fuzz: a bad value is a ConfigError, never another exception; good values load ------------------

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                      st.text(max_size=8), st.lists(st.integers(-3, 30), max_size=3),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
OVERRIDE_TEXT = st.one_of(st.text(max_size=10), st.sampled_from(
    ["-1", "0", "1e6", "1e-400", "1" + "0" * 400, ".nan", "-.inf", "[1, 2]", "{a: 1}", "null", "true", "2-7", "!!x 1"]))


def fields_of(cls) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def load_or_config_error(cls, **kw):
    """``load_config(cls, **kw)``, or None if it raised a ``ConfigError``; any other exception fails the test."""
    try:
        return load_config(cls, **kw)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)
        return None


@pytest.mark.parametrize("cls", [DistillConfig, TinyTrainConfig])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_config_values_are_config_errors_or_load(cls, data):
    keys = st.sampled_from(fields_of(cls))
    typed = data.draw(st.dictionaries(keys, ANY_VALUE, max_size=3))
    text = data.draw(st.lists(st.tuples(keys, OVERRIDE_TEXT), max_size=3))
    for kw in ({"base": typed}, {"overrides": [f"{k}={v}" for k, v in text]}):
        cfg = load_or_config_error(cls, **kw)
        assert cfg is None or isinstance(cfg, cls)


@settings(max_examples=200, deadline=None)
@given(lr=st.floats(1e-8, 1.0), steps=st.integers(1, 10**9), batch=st.integers(1, 512), warmup=st.integers(0, 10**6),
       lam=st.floats(0, 1e6), temp=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32 - 1),
       trainable=st.sampled_from(["matched_heads", "attention", "all", "lora"]))
def test_fuzz_good_distill_values_load(lr, steps, batch, warmup, lam, temp, seed, trainable):
    over = [f"lr={lr!r}", f"steps={steps}", f"batch_size={batch}", f"warmup={warmup}", f"lam={lam!r}",
            f"temperature={temp!r}", f"seed={seed}", f"trainable={trainable}"]
    c = load_config(DistillConfig, None, over)
    assert (c.lr, c.steps, c.batch_size, c.warmup, c.lam, c.temperature, c.seed, c.trainable) == \
        (lr, steps, batch, warmup, lam, temp, seed, trainable)


@settings(max_examples=200, deadline=None)
@given(lr=st.floats(1e-8, 1.0), lo=st.integers(2, 24), span=st.integers(0, 22), kv=st.sampled_from([1, 2, 4]),
       heads_per_kv=st.integers(1, 4), head_dim=st.integers(1, 16), boxes=st.lists(st.integers(2, 24), min_size=1),
       seed=st.integers(0, 2**32 - 1))
def test_fuzz_good_tiny_values_load(lr, lo, span, kv, heads_per_kv, head_dim, boxes, seed):
    hi = min(lo + span, 24)
    heads = kv * heads_per_kv
    over = [f"lr={lr!r}", f"min_boxes={lo}", f"max_boxes={hi}", f"n_kv_heads={kv}", f"n_heads={heads}",
            f"d_model={heads * head_dim}", f"target_boxes={boxes}", f"seed={seed}"]
    c = load_config(TinyTrainConfig, None, over)
    assert (c.lr, c.min_boxes, c.max_boxes, c.n_heads, c.target_boxes, c.seed) == (lr, lo, hi, heads, boxes, seed)


@pytest.mark.parametrize("cls, key, bad", [
    (DistillConfig, "lr", st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                    st.just(math.nan))),
    (TinyTrainConfig, "lr", st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True))),
    (DistillConfig, "steps", st.integers(max_value=0)),
    (DistillConfig, "weight_decay", st.one_of(st.floats(max_value=-1e-300), st.just(math.inf))),
    (TinyTrainConfig, "n_kv_heads", st.integers(max_value=0)),
    (TinyTrainConfig, "max_steps", st.integers(max_value=0)),
])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_bad_numbers_are_config_errors(cls, key, bad, data):
    value = data.draw(bad)
    with pytest.raises(ConfigError, match=key):
        load_config(cls, base={key: value})


@pytest.mark.parametrize("kind", ["distill", "train-tiny"])
def test_output_directory_that_is_a_file_is_one_line(kind, setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("keep me\n")
    line = one_line(*run_cli(capsys, command_args(kind, setup, out)))
    assert f"output directory {out} is a file" in line and out.read_text() == "keep me\n"


def test_usage_errors_are_one_line_and_overrides_may_follow_options(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--config", str(setup["yaml"]), "--no-such-flag"])
    assert e.value.code == 2
    line = one_line(2, capsys.readouterr().err)
    assert "unrecognized arguments: --no-such-flag" in line
    # key=value overrides after --quiet / --resume are overrides, not an argparse error
    line = one_line(*run_cli(capsys, ["distill", "--config", str(setup["yaml"]), "--quiet", "lr=2",
                                      f"out_dir={tmp_path / 'd'}"]))
    assert "lr must be in (0, 1]" in line


# ---- model loading: one line for each predictable mistake ---------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("nosuchmodel", "no such model directory 'nosuchmodel'"),
    ("./nope/model", "no such model directory"),
    ("some-org/some-model", "could not fetch 'some-org/some-model' from the Hugging Face hub"),
])
def test_missing_models_and_unreachable_hub_are_one_line(capsys, name, message):
    """A plain name that is no directory is not sent to the hub; a hub id without network says so and
    how to pass a local directory (the tests run with HF_HUB_OFFLINE=1)."""
    line = one_line(*run_cli(capsys, ["inspect", name]))
    assert message in line
    if "hub" in message:
        assert "local directory" in line


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_are_one_line(capsys, tmp_path, damage):
    d = tiny_model("llama", tmp_path / "m", seed=0)
    w = Path(d) / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    line = one_line(*run_cli(capsys, ["inspect", str(d)]))
    assert "could not read the weights" in line and "corrupt or truncated" in line
