import json

import pytest
import torch

from circuit_distill import load_model, tiny_model
from circuit_distill.errors import CircuitDistillError, SelfCheckError, UnsupportedModelError
from circuit_distill.model import arch as arch_mod
from circuit_distill.model.loading import self_check
from conftest import DECODER_FAMILIES


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_load_and_self_check(tiny_dirs, family):
    m = load_model(tiny_dirs[family])
    assert m.arch.family.name == family
    assert m.self_check_error is not None and m.self_check_error < 1e-5
    assert m.arch.n_layers == 2 and m.arch.n_heads == 4 and m.arch.d_head == 16
    assert m.arch.n_kv_heads == (2 if family in ("llama", "mistral", "qwen2", "qwen3") else 4)
    assert m.n_params == sum(p.numel() for p in m.hf.parameters())
    ids = torch.tensor([[5, 6, 7]])
    assert m(ids).shape == (1, 3, len(m.tokenizer))


def test_bert_loads_as_masked_lm(tiny_bert_dir):
    m = load_model(tiny_bert_dir)
    assert m.is_encoder and m.arch.family.causal is False
    assert m.self_check_error < 1e-5


def test_unknown_family_is_clear(tmp_path):
    d = tiny_model("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((UnsupportedModelError, ValueError, KeyError)):
        load_model(d)
    with pytest.raises(UnsupportedModelError, match=r"Supported families: llama.*gpt2.*gpt_neox.*register_family"):
        arch_mod.family_for("t5")


def test_missing_directory_errors(tmp_path):
    with pytest.raises(CircuitDistillError, match="no such model directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitDistillError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(CircuitDistillError, match="no built-in model"):
        load_model("builtin:does-not-exist")


def test_broken_spec_fails_self_check(tiny_dirs, monkeypatch):
    # A GPT-2 spec that forgets Conv1D stores [in, out] slices heads the wrong way: must be caught.
    m = load_model(tiny_dirs["gpt2"])
    broken = arch_mod.FamilySpec(**{**m.arch.family.__dict__, "o_conv1d": False})
    m.arch.family = broken
    with pytest.raises(SelfCheckError, match=r"gpt2.*attn\.c_proj.*do not add up"):
        self_check(m)


def test_wrong_o_proj_path_is_named(tiny_dirs):
    m = load_model(tiny_dirs["llama"])
    m.arch.family = arch_mod.FamilySpec(**{**m.arch.family.__dict__, "o_proj": "self_attn.out_proj"})
    with pytest.raises(SelfCheckError, match="no output projection at 'model.layers.0.self_attn.out_proj'"):
        self_check(m)


def test_dtype_argument(tiny_dirs):
    m = load_model(tiny_dirs["llama"], dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    assert m.self_check_error is not None


def test_local_load_never_touches_network(tiny_dirs, monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model(tiny_dirs["qwen3"])
