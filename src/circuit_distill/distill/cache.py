"""Teacher activation cache: the teacher's head activations and answer logits, computed once.

``build_cache(teacher, train, components, positions, path)`` runs the teacher over the training set
and writes safetensors shards (atomically: tmp file then ``os.replace``) and ``index.json``.
``TeacherCache.load(path)`` serves the rows of a batch of example indices, so training with the
cache runs no teacher forward. With ``positions == "all"`` each head is stored as
``[n, seq, d_head]`` with the attention mask ``[n, seq]``; otherwise one row per prompt: ``[n, d_head]`` at
one named position, ``[n, k * d_head]`` at ``k`` comma-separated ones (``tasks.positions.prompt_rows``).
The rows are read at the positions of the task data the cache is built on, so a teacher whose tokenizer
differs from the student's is cached on its own tokenization of the same prompts.

A cache can also hold the teacher's *intervened* answer logits ``[n, V]`` of the interchange
interventions IIT trains on (``distill.iit.cache_interchanges`` computes them; ``add_intervened``
stores one ``intervened-XXXXX.safetensors`` file per key, listed in ``index.json`` under
``"intervened"``). Only the answer position is kept: ``n * V * 4`` bytes per key in float32 (2,000
prompts of a 64-token vocabulary: 0.5 MB; 512 prompts of a 49,152-token vocabulary: 100 MB), half
that when stored as float16/bfloat16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..files import atomic_write, atomic_write_json
from ..model.components import Component, parse_components
from ..model.hooks import capture
from ..model.logits import answer_logits
from ..tasks.base import TaskData
from ..tasks.positions import prompt_rows, task_positions

INDEX = "index.json"
FORMAT = 1


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


@torch.no_grad()
def teacher_outputs(teacher, td: TaskData, components: Sequence[Component], positions: str,
                    idx: torch.Tensor | None = None) -> tuple[dict[Component, torch.Tensor], torch.Tensor]:
    """One teacher forward on rows ``idx`` of ``td``: ``({head: [b, seq, d] if positions == "all" else
    [b, d] at one named position, [b, k * d] at k comma-separated ones (``prompt_rows``)}, answer logits [b, V])``
    (answer at ``positions["last"]``)."""
    b = td.clean if idx is None else td.clean.subset(idx)
    last = td.positions["last"] if idx is None else td.positions["last"][idx]
    with capture(teacher, list(components), detach=True) as cap:  # unembedding at the answer position only
        logits = answer_logits(teacher, b.input_ids.to(teacher.device), b.attention_mask.to(teacher.device), last)
        acts = {}
        for c in components:
            a = cap[c]
            if positions != "all":
                a = prompt_rows(a, b.attention_mask, task_positions(td, positions, idx))
            acts[c] = a.float()
    return acts, logits.float()


def build_cache(teacher, train: TaskData, components: Sequence[Component | str], positions: str,
                path: str | os.PathLike, *, batch_size: int = 128, shard_rows: int = 4096,
                logits: bool = True) -> TeacherCache:
    """Run ``teacher`` over ``train`` and write the cache to directory ``path``; return it loaded.

    Writes ``shard-XXXXX.safetensors`` (keys: component names, ``logits [r, V]``, ``mask [r, seq]``)
    and ``index.json`` (n, positions, components, shard row ranges, teacher name). ``logits=False``
    stores ``[r, 0]`` instead (across tokenizers nothing reads them: Gemma 3's are 1 MB per prompt).
    """
    comps = sorted(set(parse_components(components)))
    if not comps:
        raise ConfigError("the teacher cache needs at least one teacher component")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = len(train)
    shards = []
    for s0 in range(0, n, shard_rows):
        s1 = min(n, s0 + shard_rows)
        parts: dict[str, list[torch.Tensor]] = {}
        for b0 in range(s0, s1, batch_size):
            idx = torch.arange(b0, min(s1, b0 + batch_size))
            acts, out = teacher_outputs(teacher, train, comps, positions, idx)
            for c, a in acts.items():
                parts.setdefault(str(c), []).append(a.cpu())
            parts.setdefault("logits", []).append(out.cpu() if logits else out.new_zeros(len(idx), 0).cpu())
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["mask"] = train.clean.attention_mask[s0:s1].to(torch.int8)
        name = f"shard-{len(shards):05d}.safetensors"
        _atomic_save(tensors, path / name)
        shards.append({"file": name, "start": s0, "stop": s1})
    index = {"format": FORMAT, "n": n, "positions": positions, "components": [str(c) for c in comps],
             "teacher": getattr(teacher, "name", ""), "task": train.name, "shards": shards,
             "seq_len": int(train.clean.input_ids.shape[1])}
    atomic_write_json(path / INDEX, index)
    return TeacherCache.load(path)


class TeacherCache:
    """Cached teacher rows held in memory: ``rows(idx) -> ({component: [b, seq, d] or [b, d]}, logits [b, V])``."""

    def __init__(self, index: dict, tensors: dict[str, torch.Tensor], path: Path | None = None):
        self.index = index
        self.path = path
        self.positions: str = index["positions"]
        self.components = parse_components(index["components"])
        self._t = tensors

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherCache:
        path = Path(path)
        if not (path / INDEX).exists():
            raise ConfigError(f"{path} is not a teacher cache (no {INDEX}); build it with build_cache(...)")
        index = json.loads((path / INDEX).read_text())
        parts: dict[str, list[torch.Tensor]] = {}
        for sh in index["shards"]:
            for k, v in load_file(str(path / sh["file"])).items():
                parts.setdefault(k, []).append(v)
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        for key, file in index.get("intervened", {}).items():
            tensors[key] = load_file(str(path / file))[key]
        return cls(index, tensors, path)

    def __len__(self) -> int:
        return int(self.index["n"])

    def check(self, components: Sequence[Component], positions: str, n: int) -> None:
        """Raise ``ConfigError`` unless the cache covers ``components`` at ``positions`` for ``n`` rows."""
        missing = [str(c) for c in components if c not in self.components]
        if missing:
            raise ConfigError(f"the teacher cache has no {', '.join(missing)}; rebuild it (use_cache with a "
                              "fresh out_dir) or pass the teacher")
        if positions != self.positions:
            raise ConfigError(f"the teacher cache was built for positions {self.positions!r}, not {positions!r}; "
                              "rebuild it")
        if n != len(self):
            raise ConfigError(f"the teacher cache holds {len(self)} rows but the training set has {n}; rebuild it")

    def rows(self, idx: torch.Tensor, components: Sequence[Component] | None = None
             ) -> tuple[dict[Component, torch.Tensor], torch.Tensor]:
        """Rows ``idx [b]``: ``({component: [b, seq, d_head] ("all") or [b, d_head]}, answer logits [b, V])``."""
        comps = self.components if components is None else components
        return {c: self._t[str(c)][idx] for c in comps}, self._t["logits"][idx]

    def with_logits_of(self, other: TeacherCache) -> TeacherCache:
        """This cache's activations with ``other``'s answer logits (a cache of the same rows): the
        untrained-teacher control aligns with one teacher's activations and takes its CE labels and KD
        targets from the trained teacher. In memory only (``path`` None)."""
        if len(other) != len(self) or not torch.equal(other.mask, self.mask):
            raise ConfigError("with_logits_of needs two caches of the same training rows; build both on one set")
        index = {**self.index, "teacher": f"{self.index.get('teacher', '')} (logits: {other.index.get('teacher', '')})"}
        return TeacherCache(index, {**self._t, "logits": other.rows(torch.arange(len(other)), [])[1]})

    @property
    def mask(self) -> torch.Tensor:
        """Attention mask of the cached rows ``[n, seq]``."""
        return self._t["mask"].long()

    def has_intervened(self, key: str) -> bool:
        """True if the cache holds the intervened answer logits called ``key`` (``distill.iit.Interchange.key``)."""
        return key in self.index.get("intervened", {})

    def intervened(self, idx: torch.Tensor, key: str) -> torch.Tensor:
        """The teacher's intervened answer logits ``[b, V]`` (float32) of rows ``idx [b]`` under intervention ``key``."""
        if not self.has_intervened(key):
            raise ConfigError(f"the teacher cache holds no intervened logits for {key!r}; add them with "
                              "distill.iit.cache_interchanges(cache, teacher, train, ...) or pass the teacher")
        return self._t[key][idx].float()

    def add_intervened(self, key: str, logits: torch.Tensor, *, save: bool = True) -> None:
        """Hold ``logits [n, V]`` (the teacher's intervened answer logits of every row) under ``key``; with
        ``save`` and a cache directory, also write them (atomically) and list them in ``index.json``."""
        if logits.dim() != 2 or logits.shape[0] != len(self):
            raise ConfigError(f"intervened logits must be [n, V] with n = {len(self)}, got {tuple(logits.shape)}")
        files = dict(self.index.get("intervened", {}))
        file = files.get(key, f"intervened-{len(files):05d}.safetensors")
        files[key] = file
        self._t[key] = logits
        self.index = {**self.index, "intervened": files}
        if save and self.path is not None:
            _atomic_save({key: logits}, self.path / file)
            atomic_write_json(self.path / INDEX, self.index)
