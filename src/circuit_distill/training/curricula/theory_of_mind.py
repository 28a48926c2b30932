"""How ``train_tiny`` trains a model on ``theory_of_mind``: training stories, frozen entity words and
the held-out measurement per case on words never seen in training.

**Unseen words.** Competence is measured on the task's ``test`` split: characters, containers,
drinks and places that never occur in training. A word-level model can answer with a word it never
saw only if nothing it learned is specific to words. So every word of the task's entity pools (both
splits) keeps the random embedding it is initialised with (std 1/sqrt(d_model); input and output
embeddings tied, those rows frozen, no weight decay) and never occurs in training: the training
stories draw their characters, containers, drinks and places from ``fillers`` training-only words
``e0 .. eN`` whose embeddings are drawn afresh at every step. The mechanism is learned on new random
vectors all the time, so it cannot rest on features of particular vectors, and it applies to the
task's words (train and test split alike). Measured on the way: with the train split's words in the
training draw, or fixed filler vectors, the model learns a bias towards the vectors it saw as
answers and answers unseen drinks poorly. The template words (and the answer ``unknown``) are
trained as usual; with ``fillers=0`` the stories use the train split's words.

**Training sequences.** One story, then ``n_queries`` questions, the loss on the answers only. The
first question is token for token a ``make_task("theory_of_mind")`` prompt and its answer (the
three cases equally often). The others ask a random character about a random container of the
story and are answered by the rule the task's cases follow (``belief``): a character believes the
last filling of the container that it saw (its own actions, and the other's if it can observe them),
and "unknown" if it saw none. A fraction ``easy_fraction`` of these extra questions is in an easier
form that stops right after the container (``... What does Bob believe the bottle beer .``), so the
answer is predicted at the container token itself (as the easy ``Box T object`` form of entity
tracking does).

**Binding question** (``bind_fraction``, an easier auxiliary form). A fraction of the extra questions
asks what a character first filled its container with (``Question : What did Bob first fill the bottle
with ? Answer : beer``), answered by one filling sentence alone, whether or not the container was
refilled since. Why: true belief (Q sees P: the refill, always at the same place) and unknown (Q does
not see P: "unknown") can be answered from the visibility sentence alone, and a model trained without
this question learned exactly that (true belief 1.0, unknown 0.88-1.0, false belief 0.0-0.06 at step
4,750). False belief is the one case that needs the container -> drink binding: the queried
container's *first* filling, found by matching the question's container (a fresh random vector) with
its mention in the story. The belief questions train it only mixed with the visibility rule; the
binding question trains the lookup alone.

**Order question** (``order_fraction``, an easier auxiliary form). A fraction of the extra questions
asks whether a character grabbed its container first (``Question : Did Bob grab a container first ?
Answer : yes``). Why: false belief and unknown differ only in whether the queried container and the
queried character come from the same filling sentence; which sentence a word comes from can be read
from template words next to its mentions (``training.tiny_init``: order heads). A teacher trained
without this question (run j of ``docs/theory-of-mind-training.md``, step 2,250) had the container's
sentence linearly decodable at the answer (0.97 on held-out "cannot" stories) and the character's not
(0.50); false belief and unknown traded against each other (0.52 / 0.43 at step 1,750, 0.15 / 0.82 at
2,250). The question trains the character's half alone; the character stands 7 words before the
answer, where the task's question has it.

**Ownership question** (``own_fraction``). ``Question : Did Bob fill the bottle first ? Answer : yes``:
the false belief / unknown distinction itself, in yes/no form, with the character and the container at
the task question's offsets (7 and 4 words before the answer). Why: with the order question (run m,
step 1,000) the model answered it (0.965 in place) and the character's sentence was decodable at the
order question's answer (0.98) but not at the task question's (0.47): it learned the readout for that
question's context only.

**Case weights** (``case_weights``). How often the story (and the task's question) is of each case
(true belief, false belief, unknown; default equal). Why: the order heads' toy learned to tell false
belief from unknown on "cannot" stories alone (0.977 at step 1,200) but not with true-belief stories in a
third of the sequences (0.60-0.69 at steps 300-1,300, where true belief and "unknown" alone give 0.67),
and no teacher run with equal cases did (runs j-o). True belief is learned from few examples (the refill,
always at one place; 0.975 by step 1,000 in run k), so it can be rare.

**Recap** (``recap_fraction``, a denser form of the same lookup). A fraction of the sequences ends
with the two filling sentences again, in random order (``Bob grabs an opaque bottle and fills it with
beer .``), each container and drink a target: four bindings per recap (name -> container, container
-> drink), with no question or visibility rule around them. Why: with the binding question alone
(3 layers, d_model 128, batch 32, story loss, ``bind_fraction`` 0.4) the model had still not learned
to match a word with its earlier mention at step 2,250: on false-belief prompts it answered
"unknown" (0.61-0.96 of them) or one of the two first drinks at random (Q's 0.215, P's 0.175 at step
2,000), and it answered the binding question (asked after the task's question, as in training) with
one of the two first drinks at chance (right 0.465 at step 2,250); held-out false belief went 0.06,
0.30, 0.30, 0.03, 0.17, 0.11 at steps 1,000-2,250. The recap did not change that either (run b of
``docs/theory-of-mind-training.md``: binding right 0.495 at step 4,000); it stays because it costs
little and trains the lookup where no other rule answers it.

**Entity shift** (``TinyTrainConfig.entity_shift``, applied by ``train_tiny``): every entity embedding
(the task's frozen words and the redrawn fillers alike) gets one fixed random vector added. Why: the
model has no biases and no absolute positions, so in the first layer the query at an entity word is a
function of that word's random vector alone: no head there can look back by position (e.g. a drink
reading its container five words back, which is what the binding needs). Measured (attention of the
recap's drink prediction, 64 test-split stories): without the shift, at step 4,000, every first-layer
head at the story's drink positions spread its attention evenly (0.04 on the container), and the
heads that fetch a drink for the recap put equal mass on the matching and the other story drink
(0.33 / 0.33); with a shift of norm 1, at step 750, first-layer heads at the drinks look back by
position (one puts 0.67 on the word before). Unseen words stay like the training words: their random
part is never seen and the shift is shared. The shift alone did not bring the binding by step 3,000
(see ``docs/theory-of-mind-training.md``: no teacher reaches the bar yet).

The eight entities of a story are distinct words (the kinds share the filler pool; drawn
independently, about one story in eleven gave one word two roles, e.g. a drink that is also a name).

**Story loss** (``story_loss``, an easier auxiliary signal). With the loss on the answers only, a
model must learn to copy a word it has never seen (a fresh random vector) from the context before any
answer improves, and a 3-layer model at batch 32 showed no sign of it after 500 steps (the mass on the
story's entities was at chance). With ``story_loss`` every word that can be predicted from what came
before is a target too: the template words, and each entity mentioned before (the refilling character
and container, the names of the visibility sentences, the question's entities); first mentions are
not. Most of these are copies of an earlier entity, so copying is trained at many positions of every
sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...errors import ConfigError
from ...model.tokenizer import word_level_tokenizer
from ...tasks import evaluate, make_task, task_vocabulary
from ...tasks.theory_of_mind import CASES, CHARACTERS, CONTAINERS, DRINKS, PLACES

QUESTION = ("Question", ":", "What", "does")
BIND_WORDS = ("did", "first", "fill")  # the binding question's words (not in the task's vocabulary)
ORDER_WORDS = ("Did", "grab", "container", "yes", "no")  # the order question's (also not in the task's)
TRAIN_PREFIX = "train:"  # report key of a case measured on the train split


@dataclass(frozen=True)
class Story:
    """One story of the task: ``c1`` and ``c2`` fill ``containers[0]`` / ``[1]`` with ``drinks[0]`` /
    ``[1]``; then ``p`` (the character not queried, ``q``) refills ``container`` with ``drinks[2]``;
    ``q_sees`` / ``p_sees``: whether q observes p and p observes q."""

    c1: str
    c2: str
    q_index: int
    place: str
    containers: tuple[str, str]
    drinks: tuple[str, str, str]
    container: str
    q_sees: bool
    p_sees: bool

    @property
    def q(self) -> str:
        return (self.c1, self.c2)[self.q_index]

    @property
    def p(self) -> str:
        return (self.c1, self.c2)[1 - self.q_index]


def entity_pools(fillers: int) -> dict[str, list[str]]:
    """The training draw of each entity kind: the filler words (with no fillers, the task's ``train``
    split)."""
    return {kind: filler_words(fillers) or list(pool)[0::2]
            for kind, pool in (("characters", CHARACTERS), ("containers", CONTAINERS), ("drinks", DRINKS),
                               ("places", PLACES))}


def filler_words(fillers: int) -> list[str]:
    """The training-only entity words ``e0 .. e{fillers-1}``."""
    return [f"e{i}" for i in range(fillers)]


def sample_story(rng: random.Random, pools: dict[str, list[str]], weights: list[float] | None = None) -> Story:
    """A story of one of the three cases (uniformly, or by ``weights`` over ``CASES``), drawn like the task
    generator draws it; its eight entities are distinct words even when the kinds share one pool (the fillers)."""
    case = rng.choices(CASES, weights)[0] if weights and len(set(weights)) > 1 else rng.choice(CASES)
    q_index = rng.randint(0, 1)
    own = rng.random() < 0.5 if case == "true_belief" else case == "false_belief"
    used: set[str] = set()

    def draw(kind: str, k: int) -> list[str]:
        out = rng.sample([w for w in pools[kind] if w not in used], k)
        used.update(out)
        return out

    c1, c2 = draw("characters", 2)
    containers, drinks = tuple(draw("containers", 2)), tuple(draw("drinks", 3))
    return Story(c1, c2, q_index, draw("places", 1)[0], containers, drinks,
                 containers[q_index if own else 1 - q_index], case == "true_belief", rng.random() < 0.5)


def story_words(s: Story) -> list[str]:
    """The story's words, as the ``theory_of_mind`` generator writes them (before the question)."""
    words = [s.c1, "and", s.c2, "are", "working", "in", "a", "busy", s.place, "."]
    for i, who in enumerate((s.c1, s.c2)):
        words += ["Then"] * i + [who, "grabs", ("an", "another")[i], "opaque", s.containers[i], "and", "fills",
                                 "it", "with", s.drinks[i], "."]
    words += ["Later", ",", s.p, "empties", "the", s.container, "and", "fills", "it", "with", s.drinks[2], "."]
    for who, other, sees in ((s.q, s.p, s.q_sees), (s.p, s.q, s.p_sees)):
        words += [who, "can" if sees else "cannot", "observe", other, "'", "s", "actions", "."]
    return words


def question_words(who: str, container: str, *, easy: bool = False) -> list[str]:
    """The question of ``who``'s belief about ``container``; the easy form stops at the container."""
    words = [*QUESTION, who, "believe", "the", container]
    return words if easy else words + ["contains", "?", "Answer", ":"]


def binding_words(who: str, container: str) -> list[str]:
    """The binding question: what ``who`` first filled ``container`` with (``who`` grabbed it)."""
    return [*QUESTION[:3], "did", who, "first", "fill", "the", container, "with", "?", "Answer", ":"]


def order_words(who: str) -> list[str]:
    """The order question: did ``who`` grab its container first (is it the first filling sentence's
    character)? ``who`` stands 7 words before the answer, as the character does in the task's question."""
    return ["Question", ":", "Did", who, "grab", "a", "container", "first", "?", "Answer", ":"]


def own_words(who: str, container: str) -> list[str]:
    """The ownership question: did ``who`` fill ``container`` first? ``who`` stands 7 words and ``container``
    4 words before the answer, where the task's question has its character and container."""
    return ["Question", ":", "Did", who, "fill", "the", container, "first", "?", "Answer", ":"]


def belief(s: Story, who: str, container: str) -> str:
    """What ``who`` believes ``container`` holds: the last filling of it that ``who`` saw, else "unknown"."""
    fills = [(s.c1, s.containers[0], s.drinks[0]), (s.c2, s.containers[1], s.drinks[1]),
             (s.p, s.container, s.drinks[2])]
    sees = s.q_sees if who == s.q else s.p_sees
    seen = [d for actor, c, d in fills if c == container and (actor == who or sees)]
    return seen[-1] if seen else "unknown"


def story_targets(words: list[str], targets: list[int], vocab: dict[str, int], entities: set[str]) -> list[int]:
    """``targets`` with every predictable next word added (``story_loss``): a template word, or an entity
    that occurs earlier in the sequence (a first mention cannot be predicted and stays -100)."""
    out, seen = list(targets), set()
    for j, w in enumerate(words):
        if j and out[j - 1] == -100 and (w not in entities or w in seen):
            out[j - 1] = vocab[w]
        seen.add(w)
    return out


def extra_question(s: Story, rng: random.Random, cfg) -> tuple[list[str], str]:
    """An extra question of story ``s`` and its answer: with probability ``bind_fraction`` the binding
    question about one of the two filling sentences (answer: its drink), else a random character's
    belief about a random container (``easy_fraction`` of these in the easy form); with probability
    ``order_fraction`` the order question about one of the two characters (answer: yes or no), with
    ``own_fraction`` the ownership question about a character and a container (yes or no)."""
    r = rng.random()
    to_order = cfg.bind_fraction + cfg.order_fraction
    if r < cfg.bind_fraction:
        i = rng.randint(0, 1)
        return binding_words((s.c1, s.c2)[i], s.containers[i]), s.drinks[i]
    if r < to_order:
        i = rng.randint(0, 1)
        return order_words((s.c1, s.c2)[i]), ("yes", "no")[i]
    if r < to_order + cfg.own_fraction:
        i, j = rng.randint(0, 1), rng.randint(0, 1)
        return own_words((s.c1, s.c2)[i], s.containers[j]), ("yes" if i == j else "no")
    who, cont = rng.choice((s.c1, s.c2)), rng.choice(s.containers)
    return question_words(who, cont, easy=rng.random() < cfg.easy_fraction), belief(s, who, cont)


def recap_words(s: Story, rng: random.Random) -> tuple[list[str], list[int]]:
    """The two filling sentences of ``s`` again, in random order (``NAME grabs an opaque CONT and fills it
    with DRINK .``), and the indices of the words the bindings predict: each container and each drink."""
    words, predicted = [], []
    for i in rng.sample((0, 1), 2):
        predicted += [len(words) + 4, len(words) + 9]
        words += [(s.c1, s.c2)[i], "grabs", "an", "opaque", s.containers[i], "and", "fills", "it", "with",
                  s.drinks[i], "."]
    return words, predicted


def case_mix(cfg) -> str:
    """How often the cases are drawn, in words (for the model card)."""
    w = cfg.case_weights
    if len(set(w)) == 1:
        return "the three cases equally often"
    return "cases drawn with weights " + ", ".join(f"{c} {x:g}" for c, x in zip(CASES, w))


def extra_mix(cfg) -> str:
    """What the extra questions are, in words (for the model card)."""
    if cfg.n_queries < 2:
        return ""
    parts = [(getattr(cfg, k), name) for k, name in (("bind_fraction", "the binding question"),
                                                         ("order_fraction", "the order question"),
                                                         ("own_fraction", "the ownership question"))]
    rest = 1.0 - sum(f for f, _ in parts)
    named = [f"{f:.0%} {name}" for f, name in parts if f]
    if rest > 1e-9:
        named.append(f"{rest:.0%} a random character's belief ({cfg.easy_fraction:.0%} of those in the easy form)")
    return "; the others: " + ", ".join(named)


def init_text(cfg) -> str:
    """The structured initialisation, in words (for the model card)."""
    if not cfg.lookback_offsets:
        return ""
    return (f"; initialised with the lookback circuit (`training.tiny_init`: first-layer heads "
            f"{', '.join(map(str, cfg.lookback_offsets))} words back, binding heads {list(cfg.bind_heads)}"
            + (f", order heads {list(cfg.order_heads)}" if cfg.order_heads else "") + ")")


class TheoryOfMindCurriculum:
    """``theory_of_mind`` for ``train_tiny`` (see the module docstring)."""

    name = "theory_of_mind"
    tied_embeddings = True

    def validate(self, cfg) -> None:
        w = cfg.case_weights
        if len(w) != len(CASES) or min(w) < 0 or not 0 < sum(w) < float("inf"):
            raise ConfigError(f"case_weights: one weight >= 0 per case ({', '.join(CASES)}), not all 0; got {w}")
        bad = [c for c in cfg.target_cases if c not in CASES]
        if bad or not cfg.target_cases:
            raise ConfigError(f"target_cases must be a non-empty subset of {', '.join(CASES)}, got {cfg.target_cases}")
        if cfg.fillers < 0:
            raise ConfigError(f"fillers must be >= 0, got {cfg.fillers}")

    def tokenizer(self, cfg):
        """Word-level, over the task's vocabulary (both splits), the binding and order questions' words and the
        fillers."""
        return word_level_tokenizer(task_vocabulary("theory_of_mind") + list(BIND_WORDS) + list(ORDER_WORDS)
                                    + filler_words(cfg.fillers))

    def frozen_words(self, cfg) -> list[str]:
        """Every entity word: its embedding stays at its random initialisation."""
        return [*CHARACTERS, *CONTAINERS, *DRINKS, *PLACES, *filler_words(cfg.fillers)]

    def redrawn_words(self, cfg) -> list[str]:
        """The fillers: fresh random embeddings at every step."""
        return filler_words(cfg.fillers)

    def rows(self, cfg, rng: random.Random, vocab: dict[str, int]) -> tuple[list[list[int]], list[list[int]]]:
        """``batch_size`` training sequences (token ids) and their targets (-100 but at answers)."""
        pools = entity_pools(cfg.fillers)
        rows, targets = [], []
        for _ in range(cfg.batch_size):
            s = sample_story(rng, pools, cfg.case_weights)
            words = story_words(s)
            tgt = [-100] * len(words)
            for j in range(cfg.n_queries):
                q, answer = extra_question(s, rng, cfg) if j else (question_words(s.q, s.container),
                                                                   belief(s, s.q, s.container))
                words += q + [answer, "."]
                tgt += [-100] * (len(q) - 1) + [vocab[answer], -100, -100]
            if cfg.recap_fraction and rng.random() < cfg.recap_fraction:
                more, predicted = recap_words(s, rng)
                tgt += [-100] * len(more)
                for k in predicted:  # each predicted at the word before it
                    tgt[len(words) + k - 1] = vocab[more[k]]
                words += more
            if cfg.story_loss:
                tgt = story_targets(words, tgt, vocab, set().union(*pools.values()))
            rows.append([vocab[w] for w in words])
            targets.append(tgt)
        return rows, targets

    def target_keys(self, cfg) -> list[str]:
        return list(cfg.target_cases)

    def report_keys(self, cfg) -> list[str]:
        """Every case on the test split, then on the train split (``train:CASE``)."""
        return list(CASES) + [TRAIN_PREFIX + c for c in CASES]

    def accuracy(self, model, key: str, n: int, *, final: bool) -> float:
        """Accuracy on ``n`` fresh prompts of one case: key ``CASE`` on the test split, ``train:CASE`` on
        the train split; seeds 10000 + i (evaluations during training) or 20000 + i (final), +100 on train."""
        split = "train" if key.startswith(TRAIN_PREFIX) else "test"
        case = key.removeprefix(TRAIN_PREFIX)
        seed = (20_000 if final else 10_000) + CASES.index(case) + (100 if split == "train" else 0)
        data = make_task("theory_of_mind", model.tokenizer, n, seed=seed, cases=[case], split=split,
                         n_reference=1)
        return evaluate(model, data)["accuracy"]

    def card_text(self, cfg) -> dict[str, str]:
        """The task-specific sentences of the training card."""
        return {
            "title": "Tiny theory-of-mind model (trained by circuit-distill)",
            "vocabulary": f"the `theory_of_mind` vocabulary plus {cfg.fillers} training-only words `e0..`",
            "data": f"one story and {cfg.n_queries} questions per sequence (the first the task's question, "
                    f"{case_mix(cfg)}" + extra_mix(cfg) + ")"
                    + init_text(cfg)
                    + ("; next-word loss on every predictable word too (template words, entities seen before)"
                       if cfg.story_loss else "") + ", entities drawn from the filler words only, their "
                    "embeddings drawn afresh at every step, the task's entity words never seen and their "
                    "embeddings frozen at their random initialisation (tied input/output), loss on the "
                    "answers only",
            "target": "held-out accuracy (test split: unseen names, containers, drinks) on "
                      + ", ".join(cfg.target_cases),
            "heldout": "`make_task('theory_of_mind', n={n}, cases=[CASE], split=SPLIT)`, seed 20000+i; `CASE`: "
                       "test split, `train:CASE`: train split (seed +100); with fillers, no split is seen in training",
            "key": "case",
            "chance": "A model that ignores visibility and answers what the container holds now gets "
                      "true belief right and the two other cases wrong.",
        }
