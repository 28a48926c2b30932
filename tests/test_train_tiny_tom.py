"""train-tiny on theory of mind: training stories are the task's prompts, belief rule, frozen entity
words, determinism from the seed, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from circuit_distill.cli import main
from circuit_distill.errors import ConfigError
from circuit_distill.model import load_model
from circuit_distill.tasks import make_task
from circuit_distill.tasks.theory_of_mind import CHARACTERS, DRINKS
from circuit_distill.training.curricula import curriculum_for
from circuit_distill.training.curricula.theory_of_mind import (
    Story,
    belief,
    binding_words,
    entity_pools,
    order_words,
    own_words,
    question_words,
    story_words,
)
from circuit_distill.training.tiny import (
    TinyTrainConfig,
    build_model,
    lr_factor,
    redraw_embeddings,
    sample_batch,
    tiny_optimizer,
    tiny_step,
    train_tiny,
)


def _mini(**kw) -> TinyTrainConfig:
    base = dict(task="theory_of_mind", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, batch_size=8, fillers=16,
                max_steps=12, eval_every=6, eval_n=10, report_n=10, checkpoint_every=6, warmup=5, lr=1e-2,
                seed=0, threads=1)
    base.update(kw)
    return TinyTrainConfig(**base)


def _parse(words: list[str]) -> Story:
    """The story of a generator prompt, read back from its (fixed-layout) words."""
    c1, c2, q = words[0], words[2], words[45]
    return Story(c1=c1, c2=c2, q_index=0 if q == c1 else 1, place=words[8], containers=(words[14], words[26]),
                 drinks=(words[19], words[31], words[43]), container=words[38], q_sees=words[46] == "can",
                 p_sees=words[54] == "can")


def test_rendered_story_and_belief_rule_match_the_task_generator():
    tok = curriculum_for("theory_of_mind").tokenizer(_mini())
    data = make_task("theory_of_mind", tok, 120, seed=5, split="test")
    seen = set()
    for i in range(len(data)):
        ids = data.clean.input_ids[i][data.clean.attention_mask[i].bool()].tolist()
        words = tok.convert_ids_to_tokens(ids)
        s = _parse(words)
        assert story_words(s) + question_words(s.q, s.container) == words  # token for token
        answer = belief(s, s.q, s.container)
        assert tok.convert_tokens_to_ids(answer) == int(data.answer_ids[i])
        seen.add(data.metadata[i]["case"])
    assert seen == {"true_belief", "false_belief", "unknown"}


def test_belief_rule_on_every_question_of_a_story():
    s = Story("Bob", "Carla", q_index=0, place="bar", containers=("cup", "jar"), drinks=("tea", "milk", "rum"),
              container="cup", q_sees=False, p_sees=True)  # Carla refills Bob's cup unseen by Bob
    assert belief(s, "Bob", "cup") == "tea"  # false belief
    assert belief(s, "Bob", "jar") == "unknown"  # Bob never saw Carla fill her jar
    assert belief(s, "Carla", "cup") == "rum" and belief(s, "Carla", "jar") == "milk"
    assert belief(Story(**{**s.__dict__, "q_sees": True}), "Bob", "jar") == "milk"


def test_training_batch_first_question_is_a_task_prompt_and_entities_come_from_train_and_fillers():
    cfg = _mini(n_queries=3, easy_fraction=0.5, batch_size=32)
    tok = curriculum_for("theory_of_mind").tokenizer(cfg)
    ids, mask, labels = sample_batch(cfg, tok, step=4)
    pools = entity_pools(cfg.fillers)
    allowed = set().union(*pools.values())
    easy = 0
    for r in range(ids.shape[0]):
        words = tok.convert_ids_to_tokens(ids[r][mask[r].bool()].tolist())
        s = _parse(words)
        assert words[:73] == story_words(s) + question_words(s.q, s.container)
        targets = (labels[r] != -100).nonzero()[:, 0].tolist()
        assert len(targets) == 3 and targets[0] == 72
        assert tok.convert_ids_to_tokens(int(labels[r, 72])) == belief(s, s.q, s.container) == words[73]
        for t in targets:
            assert int(labels[r, t]) == int(ids[r, t + 1])  # the answer is the next token
            easy += words[t] != ":"
        assert {s.c1, s.c2, *s.containers, *s.drinks, s.place} <= allowed
    assert 0 < easy < 64  # both forms among the extra questions
    assert not set(CHARACTERS[1::2]) & allowed and not set(DRINKS[1::2]) & allowed  # test split never drawn


def _stories(cfg: TinyTrainConfig, step: int):
    """One training batch: ``tok, ids, labels`` and per row ``(row, words, parsed story)`` (padding dropped)."""
    tok = curriculum_for("theory_of_mind").tokenizer(cfg)
    ids, mask, labels = sample_batch(cfg, tok, step=step)
    rows = []
    for r in range(ids.shape[0]):
        words = tok.convert_ids_to_tokens(ids[r][mask[r].bool()].tolist())
        rows.append((r, words, _parse(words)))
    return tok, ids, labels, rows


def test_binding_questions_ask_a_filling_sentence_and_story_entities_are_distinct():
    tok, ids, labels, rows = _stories(_mini(n_queries=4, bind_fraction=1.0, batch_size=24), step=3)
    asked = set()
    for r, words, s in rows:
        assert len({s.c1, s.c2, *s.containers, *s.drinks, s.place}) == 8  # no word in two roles
        targets = (labels[r] != -100).nonzero()[:, 0].tolist()
        for t in targets[1:]:  # every extra question: "... What did NAME first fill the CONT with ? Answer :"
            i = (s.c1, s.c2).index(words[t - 8])
            assert words[t - 12:t + 1] == binding_words(words[t - 8], s.containers[i])
            assert words[t + 1] == s.drinks[i]  # the drink of that filling sentence, refilled or not
            asked.add(i)
    assert asked == {0, 1}
    none = _mini(n_queries=4, batch_size=24)
    words = tok.convert_ids_to_tokens(sample_batch(none, tok, step=3)[0].flatten().tolist())
    assert "did" not in words and "did" in tok.get_vocab()
    with pytest.raises(ConfigError, match="bind_fraction"):
        _mini(bind_fraction=1.5)


def test_order_questions_ask_whether_a_character_came_first():
    tok, ids, labels, rows = _stories(_mini(n_queries=4, order_fraction=1.0, batch_size=24), step=5)
    answers = set()
    for r, words, s in rows:
        for t in (labels[r] != -100).nonzero()[:, 0].tolist()[1:]:  # "Question : Did NAME grab a container first ? Answer :"
            who = words[t - 7]  # 7 words before the answer, where the task's question names its character
            assert words[t - 10:t + 1] == order_words(who) and who in (s.c1, s.c2)
            assert words[t + 1] == ("yes" if who == s.c1 else "no")
            answers.add(words[t + 1])
    assert answers == {"yes", "no"}
    mixed = _mini(n_queries=4, bind_fraction=0.5, order_fraction=0.5, batch_size=24)
    words = tok.convert_ids_to_tokens(sample_batch(mixed, tok, step=5)[0].flatten().tolist())
    assert "Did" in words and "did" in words and "believe" in words  # the task's first question stays
    with pytest.raises(ConfigError, match="order_fraction"):
        _mini(bind_fraction=0.6, order_fraction=0.6).validate()


def test_ownership_questions_ask_whether_a_character_filled_a_container_first():
    tok, ids, labels, rows = _stories(_mini(n_queries=4, own_fraction=1.0, batch_size=24), step=7)
    answers = set()
    for r, words, s in rows:
        for t in (labels[r] != -100).nonzero()[:, 0].tolist()[1:]:  # "Question : Did NAME fill the CONT first ? Answer :"
            who, cont = words[t - 7], words[t - 4]  # where the task's question has its character and container
            assert words[t - 10:t + 1] == own_words(who, cont)
            owner = (s.c1, s.c2)[s.containers.index(cont)]
            assert words[t + 1] == ("yes" if who == owner else "no")
            answers.add(words[t + 1])
    assert answers == {"yes", "no"}
    with pytest.raises(ConfigError, match="own_fraction"):
        _mini(bind_fraction=0.5, own_fraction=0.6).validate()


def test_recap_repeats_the_filling_sentences_with_containers_and_drinks_as_targets():
    tok, ids, labels, rows = _stories(_mini(n_queries=2, recap_fraction=1.0, batch_size=16), step=7)
    firsts = set()
    for r, words, s in rows:
        recap = words[-22:]
        firsts.add((s.c1, s.c2).index(recap[0]))
        for k in (0, 11):
            i = (s.c1, s.c2).index(recap[k])
            assert recap[k:k + 11] == [recap[k], "grabs", "an", "opaque", s.containers[i], "and", "fills", "it", "with",
                                       s.drinks[i], "."]
        targets = [t for t in (labels[r] != -100).nonzero()[:, 0].tolist() if t >= len(words) - 23]
        assert [words[t + 1] for t in targets] == [recap[4], recap[9], recap[15], recap[20]]
        assert all(int(labels[r, t]) == int(ids[r, t + 1]) for t in targets)
    assert firsts == {0, 1}  # both orders
    none = sample_batch(_mini(n_queries=2, batch_size=16), tok, step=7)[0]
    assert none.shape[1] < ids.shape[1]


def test_story_loss_targets_every_predictable_word_and_keeps_the_answers():
    plain, story = _mini(n_queries=3, batch_size=6), _mini(n_queries=3, batch_size=6, story_loss=True)
    tok = curriculum_for("theory_of_mind").tokenizer(plain)
    ids, mask, answers = sample_batch(plain, tok, step=2)
    ids2, _, labels = sample_batch(story, tok, step=2)
    assert torch.equal(ids, ids2)  # the same sequences
    keep = answers != -100
    assert torch.equal(labels[keep], answers[keep])  # every answer still a target
    entities = set().union(*entity_pools(plain.fillers).values())
    for r in range(ids.shape[0]):
        words = tok.convert_ids_to_tokens(ids[r][mask[r].bool()].tolist())
        for t in range(len(words) - 1):
            nxt = words[t + 1]
            predictable = nxt not in entities or nxt in words[:t + 1]
            assert (int(labels[r, t]) != -100) == predictable, (t, nxt)
            if predictable:
                assert int(labels[r, t]) == int(ids[r, t + 1])
        assert words[1] == "and" and int(labels[r, 1]) == -100  # the second name is a first mention
        assert int(labels[r, 9]) == int(ids[r, 10]) == tok.convert_tokens_to_ids(words[0])  # c1 again


def test_task_words_keep_their_random_embeddings_and_fillers_are_redrawn_each_step():
    cfg = _mini()
    cur = curriculum_for("theory_of_mind")
    tok = cur.tokenizer(cfg)
    hf = build_model(cfg, tok)
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight  # tied
    vocab = tok.get_vocab()
    fillers = [vocab[w] for w in cur.redrawn_words(cfg)]
    words = [vocab[w] for w in cur.frozen_words(cfg) if vocab[w] not in fillers]  # both splits' entities
    template = [vocab[w] for w in ("believe", "unknown", "Question")]
    before = hf.get_input_embeddings().weight.detach().clone()
    assert before[words].std().item() == pytest.approx(cfg.d_model ** -0.5, rel=0.15)
    opt = tiny_optimizer(hf, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    seen = []
    for step in range(3):
        tiny_step(hf, opt, sched, cfg, tok, step)
        seen.append(hf.get_input_embeddings().weight.detach()[fillers].clone())
    after = hf.get_input_embeddings().weight.detach()
    assert torch.equal(after[words], before[words])  # train and test words alike: untouched
    assert not torch.allclose(after[template], before[template])  # the template words learn
    assert not torch.allclose(seen[0], seen[1]) and seen[1].std().item() == pytest.approx(cfg.d_model ** -0.5,
                                                                                         rel=0.15)
    hf2 = build_model(cfg, tok)
    redraw_embeddings(hf2, cfg, tok, 2)
    assert torch.equal(hf2.get_input_embeddings().weight[fillers], seen[2])  # a function of (seed, step)


def test_entity_shift_adds_one_vector_to_every_entity_word_frozen_and_redrawn():
    plain, shifted = _mini(d_model=64), _mini(d_model=64, entity_shift=2.0)
    cur = curriculum_for("theory_of_mind")
    tok = cur.tokenizer(plain)
    vocab = tok.get_vocab()
    rows = sorted(vocab[w] for w in cur.frozen_words(plain))
    fillers = [vocab[w] for w in cur.redrawn_words(plain)]
    a, b = build_model(plain, tok), build_model(shifted, tok)
    redraw_embeddings(a, plain, tok, 3)
    redraw_embeddings(b, shifted, tok, 3)
    wa, wb = a.get_input_embeddings().weight.detach(), b.get_input_embeddings().weight.detach()
    diff = wb[rows] - wa[rows]  # the same random draws, shifted by one vector
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-6)
    assert diff[0].norm().item() == pytest.approx(2.0, rel=1e-4)
    assert torch.allclose(wb[fillers] - wa[fillers], diff[: len(fillers)], atol=1e-6)
    template = [vocab[w] for w in ("believe", "Question")]
    assert torch.equal(wa[template], wb[template])
    with pytest.raises(ConfigError, match="entity_shift"):
        _mini(entity_shift=-1.0)


def test_qk_match_init_starts_each_query_head_as_a_multiple_of_its_key_head():
    cfg = _mini(n_layers=2, qk_match_init=3.0)  # 4 query heads, 2 KV heads of 8 dimensions
    tok = curriculum_for("theory_of_mind").tokenizer(cfg)
    hf, plain = build_model(cfg, tok), build_model(_mini(n_layers=2), tok)
    for layer, ref in zip(hf.model.layers, plain.model.layers):
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        for h in range(4):
            assert torch.equal(q[8 * h:8 * h + 8], 3.0 * k[8 * (h // 2):8 * (h // 2) + 8])
        assert torch.equal(k, ref.self_attn.k_proj.weight)  # the rest as without it
        assert not torch.equal(q, ref.self_attn.q_proj.weight)
    with pytest.raises(ConfigError, match="qk_match_init"):
        _mini(qk_match_init=float("nan"))


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_same_seed_same_model_and_resume_matches_uninterrupted(tmp_path):
    rec = train_tiny(_mini(), tmp_path / "a", progress=False, log=lambda m: None)
    train_tiny(_mini(), tmp_path / "b", progress=False, log=lambda m: None)
    train_tiny(_mini(max_steps=6), tmp_path / "part", progress=False, log=lambda m: None)
    train_tiny(_mini(), tmp_path / "part", resume=True, progress=False, log=lambda m: None)
    train_tiny(_mini(seed=1), tmp_path / "c", progress=False, log=lambda m: None)
    a, b, part, c = (_weights(tmp_path / d) for d in ("a", "b", "part", "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], part[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert rec["first_loss"] > rec["history"][-1]["loss"]
    assert set(rec["history"][-1]["accuracy"]) == {"true_belief", "false_belief", "unknown"}
    assert set(rec["final_accuracy"]) == {"true_belief", "false_belief", "unknown", "train:true_belief",
                                          "train:false_belief", "train:unknown"}
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["config"]["task"] == "theory_of_mind"
    assert "theory-of-mind" in (tmp_path / "a" / "README.md").read_text()
    model = load_model(tmp_path / "a")
    assert model.hf.config.tie_word_embeddings
    with pytest.raises(ConfigError, match="different configuration"):
        train_tiny(_mini(fillers=8), tmp_path / "part", resume=True, progress=False, log=lambda m: None)


def test_stopping_rule_on_cases_and_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="target_accuracy"):
        _mini(target_accuracy=0.0)
    # "unknown" is the most frequent answer: the first case a fast-learning model gets right
    rec = train_tiny(_mini(target_cases=["unknown"], target_accuracy=0.5, eval_every=3, lr=3e-2, max_steps=30),
                     tmp_path / "m", progress=False, log=lambda m: None)
    accs = [h["accuracy"]["unknown"] for h in rec["history"]]
    assert rec["reached_target"] and rec["steps"] < 30 and rec["steps"] == 3 * len(accs)
    assert accs[-1] >= 0.5 and all(a < 0.5 for a in accs[:-1])
    with pytest.raises(ConfigError, match="target_cases"):
        _mini(target_cases=["maybe"])
    with pytest.raises(ConfigError, match="cannot train task"):
        _mini(task="ioi")


def test_cli_trains_theory_of_mind(tmp_path, capsys):
    rc = main(["train-tiny", str(tmp_path / "m"), "--task", "theory_of_mind", "--layers", "1", "--d-model", "32",
               "--fillers", "8", "--max-steps", "4", "--eval-every", "2", "--eval-n", "6", "--report-n", "6",
               "--batch-size", "4", "--target-cases", "false_belief", "--threads", "1", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 4 and "train:unknown" in out["final_accuracy"]
    rec = json.loads((tmp_path / "m" / "training.json").read_text())
    assert rec["config"]["target_cases"] == ["false_belief"] and set(rec["history"][0]["accuracy"]) == {"false_belief"}


def test_case_weights_set_how_often_each_case_is_drawn(capsys):
    cfg = _mini(case_weights=[0.0, 1.0, 3.0], batch_size=200)
    tok = curriculum_for(cfg.task).tokenizer(cfg)
    words = [tok.convert_ids_to_tokens(r.tolist()) for r in sample_batch(cfg, tok, step=1)[0]]
    cases = [("true_belief" if s.q_sees else "false_belief" if s.container == s.containers[s.q_index] else "unknown")
             for s in map(_parse, words)]
    assert cases.count("true_belief") == 0 and 0.6 < cases.count("unknown") / cases.count("false_belief") / 3 < 1.6
    for bad in ([1.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 1.0]):
        with pytest.raises(ConfigError, match="case_weights"):
            _mini(case_weights=bad).validate()
    assert main(["train-tiny", "x", "--task", "theory_of_mind", "--case-weights", "a,b"]) == 2
    assert "--case-weights takes comma-separated numbers" in capsys.readouterr().err
