"""Shared fixtures: tiny models of every family, built from configs and loaded through load_model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# family -> tiny_model kwargs; the GQA families use 4 query heads over 2 KV heads
FAMILY_KW = {
    "gpt2": {},
    "llama": {"n_kv_heads": 2},
    "mistral": {"n_kv_heads": 2},
    "qwen2": {"n_kv_heads": 2},
    "qwen3": {"n_kv_heads": 2},
    "gpt_neox": {},
}
DECODER_FAMILIES = tuple(FAMILY_KW)


@pytest.fixture(scope="session", autouse=True)
def _temp_files_under_pytest_basetemp(tmp_path_factory):
    """Everything a test leaves in the default temp directory (e.g. ``tiny_model(family)`` without a
    path) goes under pytest's base temp, which pytest prunes (it keeps the last three runs)."""
    import tempfile

    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = old


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny model directory per decoder family (built once per session)."""
    from circuit_distill import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {fam: tiny_model(fam, root / fam, seed=1, **kw) for fam, kw in FAMILY_KW.items()}


@pytest.fixture(scope="session")
def distill_pair_dirs(tmp_path_factory):
    """A tiny Llama teacher (3 layers, d_model 64) and student (2 layers, d_model 32), 4 heads over 2 KV heads,
    saved once per session: the trainer, its steps and the IIT tests share them (they only read them)."""
    from circuit_distill import tiny_model

    root = tmp_path_factory.mktemp("distill_pair")
    t = tiny_model("llama", root / "teacher", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=1)
    s = tiny_model("llama", root / "student", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, seed=2)
    return t, s


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from circuit_distill import tiny_model

    return tiny_model("bert", tmp_path_factory.mktemp("tiny") / "bert", seed=1)


def random_batch(vocab: int, batch: int = 3, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, seq), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (tiny models run fastest so, above all on a shared,
    oversubscribed CPU); the previous count is restored after the module.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StopAfterCheckpoint(Exception):
    """Raised by ``interrupt_after_first_checkpoint`` in place of the rest of a run."""


def interrupt_after_first_checkpoint(run, out_dir) -> None:
    """Call ``run()`` (a ``distill`` call writing to ``out_dir``) and stop it right after its first
    checkpoint is written to the temporary file, before the atomic rename, as a kill would; then
    finish that rename by hand, so ``out_dir/checkpoint.pt`` holds exactly the first checkpoint."""
    import circuit_distill.distill.trainer as tr

    orig, calls = tr.torch.save, []

    def save_then_stop(obj, path):
        orig(obj, path)
        calls.append(path)
        raise StopAfterCheckpoint

    tr.torch.save = save_then_stop
    try:
        with pytest.raises(StopAfterCheckpoint):
            run()
    finally:
        tr.torch.save = orig
    os.replace(calls[0], os.path.join(out_dir, "checkpoint.pt"))


def hide_packages(monkeypatch, *names: str) -> None:
    """Make ``model.packaged`` fail to import any module whose name contains one of ``names`` (a model
    package that is not installed); every other import, transformers' lazy ones included, goes through."""
    from circuit_distill.model import packaged

    real_import = packaged.importlib.import_module

    def import_module(name, *a, **k):
        if any(n in name for n in names):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(packaged.importlib, "import_module", import_module)
