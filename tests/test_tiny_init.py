"""The lookback-circuit initialisation of train-tiny (theory of mind): first-layer heads look back by their
offsets, the second layer matches the question's container with each drink's container, options checked."""

from __future__ import annotations

import json
import random

import pytest
import torch

from circuit_distill.cli import main
from circuit_distill.errors import ConfigError
from circuit_distill.training.curricula import curriculum_for
from circuit_distill.training.curricula.theory_of_mind import (
    binding_words,
    entity_pools,
    question_words,
    sample_story,
    story_words,
)
from circuit_distill.training.tiny import TinyTrainConfig, build_model, redraw_embeddings

OFFSETS = [1, 2, 4, 5]
DRINKS = (19, 31)  # positions of the two first drinks in a story


def _cfg(**kw) -> TinyTrainConfig:
    base = dict(task="theory_of_mind", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, entity_shift=1.0, threads=1,
                lookback_offsets=OFFSETS, bind_heads=[2, 3])
    base.update(kw)
    return TinyTrainConfig(**base)


def _attention(cfg: TinyTrainConfig, n: int = 32):
    """Attentions of a fresh model on ``n`` training stories each followed by a binding question, and which
    filling sentence each question asks about."""
    torch.set_num_threads(1)
    cfg.validate()
    tok = curriculum_for(cfg.task).tokenizer(cfg)
    vocab = tok.get_vocab()
    hf = build_model(cfg, tok)
    hf.config._attn_implementation = "eager"
    redraw_embeddings(hf, cfg, tok, 0)
    rng, pools = random.Random(0), entity_pools(cfg.fillers)
    rows, asked = [], []
    for _ in range(n):
        s, i = sample_story(rng, pools), rng.randint(0, 1)
        rows.append([vocab[w] for w in story_words(s) + binding_words((s.c1, s.c2)[i], s.containers[i])])
        asked.append(i)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(rows), output_attentions=True)
    return out.attentions, asked


def _drink_mass(attentions, asked) -> tuple[float, float]:
    """Second-layer head 0's attention at the answer position on the asked drink and on the other first drink."""
    a, b = attentions[1][:, 0, -1], torch.arange(len(asked))
    right = torch.tensor([DRINKS[i] for i in asked])
    other = torch.tensor([DRINKS[1 - i] for i in asked])
    return a[b, right].mean().item(), a[b, other].mean().item()


def test_lookback_heads_attend_their_offset_and_the_binding_layer_prefers_the_asked_drink():
    att, asked = _attention(_cfg())
    first = att[0]
    T = first.shape[-1]
    for h, o in enumerate(OFFSETS):
        mass = torch.stack([first[:, h, q, q - o] for q in range(10, T)]).mean().item()
        assert mass > 0.8, (h, o, mass)  # measured 0.94-0.95
    right, other = _drink_mass(att, asked)
    assert right > 2.5 * other, (right, other)  # measured 0.042 vs 0.011
    plain_att, plain_asked = _attention(_cfg(lookback_offsets=[], bind_heads=[]))
    right, other = _drink_mass(plain_att, plain_asked)
    assert abs(right - other) < 0.3 * right  # without it: no preference (measured 0.0137 vs 0.0139)
    assert torch.stack([plain_att[0][:, 0, q, q - 1] for q in range(10, T)]).mean().item() < 0.2


def test_learned_rows_start_like_entity_rows_and_bad_options_are_refused():
    cfg = _cfg()
    cur = curriculum_for(cfg.task)
    tok = cur.tokenizer(cfg)
    vocab = tok.get_vocab()
    w = build_model(cfg, tok).get_input_embeddings().weight.detach()
    template = w[[vocab[x] for x in ("believe", "Question", "unknown")]]
    entity = w[[vocab[x] for x in ("beer", "Bob")]]
    assert template.norm(dim=-1).min().item() > 1.0 and entity.norm(dim=-1).min().item() > 1.0
    assert torch.cosine_similarity(template, entity[:1]).min().item() > 0.2  # the shared shift
    for bad in (dict(lookback_offsets=[1, 2]), dict(lookback_offsets=[0, 1, 2, 3]), dict(entity_shift=0.0),
                dict(bind_heads=[1, 2]), dict(bind_heads=[2]), dict(lookback_offsets=[], bind_heads=[2, 3]),
                dict(n_layers=1)):
        with pytest.raises(ConfigError, match="lookback_offsets|bind_heads"):
            _cfg(**bad).validate()


def test_cli_takes_the_lookback_options(tmp_path, capsys):
    rc = main(["train-tiny", str(tmp_path / "m"), "--task", "theory_of_mind", "--layers", "2", "--d-model", "32",
               "--fillers", "16", "--max-steps", "2", "--eval-every", "2", "--eval-n", "4", "--report-n", "4",
               "--batch-size", "2", "--entity-shift", "1", "--lookback-offsets", "1,2,4,5", "--bind-heads", "2,3",
               "--threads", "1", "--no-progress"])
    assert rc == 0
    cfg = json.loads((tmp_path / "m" / "training.json").read_text())["config"]
    assert cfg["lookback_offsets"] == OFFSETS and cfg["bind_heads"] == [2, 3]


def test_owner_head_attends_like_the_binding_head():
    cfg = _cfg(lookback_offsets=[4, 5, 9, 1], bind_heads=[0, 1, 2])
    att, asked = _attention(cfg)
    a, b = att[1][:, 2, -1], torch.arange(len(asked))  # second-layer head 2: the first head of KV group 1
    right = a[b, torch.tensor([DRINKS[i] for i in asked])].mean().item()
    other = a[b, torch.tensor([DRINKS[1 - i] for i in asked])].mean().item()
    assert right > 2.5 * other, (right, other)
    for bad in (dict(bind_heads=[0, 1, 2, 3]), dict(n_heads=4, n_kv_heads=1)):
        with pytest.raises(ConfigError, match="bind_heads"):
            _cfg(**(dict(lookback_offsets=[4, 5, 9, 1], bind_heads=[0, 1, 2]) | bad)).validate()


def test_order_head_reads_the_question_characters_mentions():
    """Second-layer head 2 (the order head) attends from the task question's answer position to the queried
    character's mentions more than to the other character's; bad order_heads are refused."""
    cfg = _cfg(lookback_offsets=[4, 5, 7, 1], bind_heads=[0, 1], order_heads=[2, 3], n_layers=3)
    torch.set_num_threads(1)
    tok = curriculum_for(cfg.task).tokenizer(cfg)
    vocab = tok.get_vocab()
    hf = build_model(cfg, tok)
    hf.config._attn_implementation = "eager"
    redraw_embeddings(hf, cfg, tok, 0)
    rng, pools = random.Random(0), entity_pools(cfg.fillers)
    stories = [sample_story(rng, pools) for _ in range(32)]
    words = [story_words(s) + question_words(s.q, s.container) for s in stories]
    with torch.no_grad():
        att = hf(input_ids=torch.tensor([[vocab[w] for w in ws] for ws in words]), output_attentions=True).attentions
    a = att[1][:, 2, -1]
    own = torch.stack([a[i, [j for j, w in enumerate(ws[:-1]) if w == s.q]].sum() for i, (s, ws) in enumerate(zip(stories, words))])
    other = torch.stack([a[i, [j for j, w in enumerate(ws) if w == s.p]].sum() for i, (s, ws) in enumerate(zip(stories, words))])
    assert own.mean() > 3 * other.mean(), (own.mean(), other.mean())  # measured 0.336 vs 0.038
    for bad in (dict(order_heads=[2]), dict(order_heads=[2, 9]), dict(bind_heads=[0, 1, 2]), dict(n_kv_heads=1)):
        with pytest.raises(ConfigError, match="order_heads|bind_heads"):
            _cfg(**(dict(lookback_offsets=[4, 5, 7, 1], bind_heads=[0, 1], order_heads=[2, 3]) | bad)).validate()
