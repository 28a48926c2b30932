"""``circuit-distill task NAME``: generate a few examples of a task and show them token by token.

    circuit-distill task ioi --n 3 --option order=ABBA --option split=test
    circuit-distill task induction --tokenizer path/to/model --option seq_len=16

Without ``--tokenizer`` a word-level tokenizer over the task's vocabulary is used.
"""

from __future__ import annotations

import json


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` -> ``(key, value)``: the value is parsed as JSON when it can be (``3``,
    ``true``, ``[3, 8]``), a comma-separated list of integers becomes a tuple (``3,8``), and
    anything else stays a string."""
    from ..errors import TaskError

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TaskError(f"--option takes key=value, got {text!r}")
    raw = raw.strip()
    if raw in ("True", "False", "None"):
        return key.strip(), {"True": True, "False": False, "None": None}[raw]
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        pass
    parts = raw.split(",")
    if len(parts) > 1 and all(p.strip().lstrip("-").isdigit() for p in parts):
        return key.strip(), tuple(int(p) for p in parts)
    return key.strip(), raw


def load_tokenizer(name: str):
    """A tokenizer from a local directory, ``builtin:NAME`` or a hub id, with a pad token set."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..model.loading import resolve_name

    if name.startswith("builtin:"):
        path, local = resolve_name(name)
    else:
        path, local = name, Path(name).expanduser().exists()
    tok = AutoTokenizer.from_pretrained(path, **({"local_files_only": True} if local else {}))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def register(sub) -> None:
    p = sub.add_parser("task", help="show examples of a task: prompts, answers, corrupted prompts, positions")
    p.add_argument("name", help="task name (ioi, induction, theory_of_mind, ...)")
    p.add_argument("--n", type=int, default=5, help="number of examples (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", metavar="MODEL", help="model directory, builtin:NAME or hub id whose tokenizer "
                   "to use (default: a word-level tokenizer over the task's vocabulary)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option (repeatable), e.g. --option split=train")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import TaskError
    from ..model.tokenizer import word_level_tokenizer
    from ..tasks import make_task, task_vocabulary

    options = dict(parse_option(o) for o in args.option)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        try:
            tok = word_level_tokenizer(task_vocabulary(args.name, **options))
        except TaskError as e:
            raise TaskError(f"{e}; or pass --tokenizer MODEL to use a model's tokenizer") from None
    data = make_task(args.name, tok, args.n, seed=args.seed, **options)

    def show(i: int) -> str:
        return repr(tok.decode([int(i)])) if i >= 0 else "-"

    print(f"task {data.name}: {len(data)} examples, width {data.clean.input_ids.shape[1]} tokens, "
          f"options {data.options}")
    for i in range(len(data)):
        print(f"\n[{i}] {data.prompts[i]!r}")
        print(f"    answer {show(data.answer_ids[i])}   wrong {show(data.wrong_ids[i])}")
        meta = data.metadata[i] if data.metadata else {}
        c_text = meta.get("corrupted_prompt") or tok.decode(
            data.corrupted.input_ids[i][data.corrupted.attention_mask[i].bool()])
        c_ans = "" if data.corrupted_answer_ids is None else f"  -> {show(data.corrupted_answer_ids[i])}"
        print(f"    corrupted {c_text!r}{c_ans}")
        for name, pos in data.positions.items():
            j = int(pos[i])
            line = f"    {name:<18} {j:>4} {show(data.clean.input_ids[i, j])}"
            if data.corrupted_positions and name in data.corrupted_positions:
                cj = int(data.corrupted_positions[name][i])
                line += f"   corrupted {cj:>4} {show(data.corrupted.input_ids[i, cj])}"
            print(line)
        shown = {k: v for k, v in meta.items() if k not in ("corrupted_prompt", "corrupted_words", "words")}
        if shown:
            print(f"    metadata {shown}")
    return 0
