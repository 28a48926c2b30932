"""Single-component ablation sweeps: each head or MLP ablated alone, the task metrics measured.

``ablation_sweep(fast=True)`` runs the clean forward of each chunk of rows once and re-runs only the
layers from each ablated component's onwards, several ablations per forward (the layer-replay engine,
``replay.py``); ``fast=False`` runs one full forward per component with ``intervene``. Both give the
same numbers to float rounding.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import CircuitDistillError, FastSweepUnsupported, TaskError
from ..model.components import Component
from ..model.hooks import intervene
from ..model.logits import answer_logits
from ..tasks.base import Batch, TaskData
from ..tasks.metrics import METRICS
from .progress import progress_bar
from .replay import LayerReplay, replay_items
from .scoring import metric_means
from .values import AblationValues, ablatable_components, ablation_values


@dataclass
class SweepResult:
    """Single-component ablation sweep.

    ``clean``: metric -> mean over examples with nothing ablated; ``ablated[comp]``: metric -> mean
    with that one component ablated. Cost: ``seconds`` of wall time and ``forwards`` in
    forward-equivalents (one full forward over all examples = 1; a re-run of ``k`` of ``N`` layers
    counts ``k / N``).
    """

    clean: dict[str, float]
    ablated: dict[Component, dict[str, float]]
    method: str
    seconds: float
    forwards: float
    per_position: bool = True
    position: str = "last"
    n_examples: int = 0
    fast: bool = True

    def effect(self, metric: str = "answer_prob") -> dict[Component, float]:
        """``clean - ablated`` per component (dP of METHOD section 1.3)."""
        if metric not in self.clean:
            raise CircuitDistillError(f"metric {metric!r} not in this sweep; it has {', '.join(self.clean)}")
        return {c: self.clean[metric] - v[metric] for c, v in self.ablated.items()}

    @property
    def components(self) -> list[Component]:
        return sorted(self.ablated)

    def to_dict(self) -> dict:
        return {
            "clean": dict(self.clean),
            "ablated": {str(c): dict(v) for c, v in sorted(self.ablated.items())},
            "method": self.method, "seconds": self.seconds, "forwards": self.forwards,
            "per_position": self.per_position, "position": self.position, "n_examples": self.n_examples,
            "fast": self.fast,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        return cls(
            clean={k: float(v) for k, v in d["clean"].items()},
            ablated={Component.parse(k): {m: float(x) for m, x in v.items()} for k, v in d["ablated"].items()},
            method=d["method"], seconds=float(d["seconds"]), forwards=float(d["forwards"]),
            per_position=bool(d.get("per_position", True)), position=d.get("position", "last"),
            n_examples=int(d.get("n_examples", 0)), fast=bool(d.get("fast", True)),
        )


def ablation_sweep(model, task_data: TaskData, components: Iterable[Component | str] | None = None, *,
                   method: str = "mean", per_position: bool = True, metrics: Sequence[str] = METRICS,
                   position: str = "last", batch_size: int = 64, fast: bool = True,
                   progress: bool | None = None, seed: int = 0,
                   values: AblationValues | None = None) -> SweepResult:
    """Ablate each component alone and measure ``metrics`` on the clean prompts.

    ``components=None``: every head and MLP. ``method``: ``mean`` (over ``task_data.reference``),
    ``zero`` or ``resample``. ``fast=True`` re-runs only the layers after each ablated component,
    several ablations per forward (up to ``batch_size`` rows); ``fast=False`` runs one full forward
    per component with ``intervene``. Both give the same numbers (to float rounding).
    """
    t0 = time.perf_counter()
    comps = ablatable_components(model, components)
    n = len(task_data)
    if n == 0:
        raise TaskError("task_data has no examples")
    metrics = tuple(metrics)
    forwards = 0.0
    if values is None:
        values = ablation_values(model, task_data, comps, method=method, per_position=per_position,
                                 seed=seed, batch_size=batch_size)
        if method != "zero":
            forwards += len(task_data.reference) / n
    pos = task_data.position(position)
    chunks = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    clean_logits: list[torch.Tensor] = []
    abl_logits: dict[Component, list[torch.Tensor]] = defaultdict(list)
    bar = progress_bar(progress, len(comps) * len(chunks), f"{method}-ablation sweep")
    try:
        for rows in chunks:
            repl = values.for_batch(task_data.clean, comps, rows=rows)
            repl = {c: v.to(model.device) for c, v in repl.items()}
            run = _replayed_chunk if fast else _forwarded_chunk
            clean, ablated, costs = run(model, task_data.clean.subset(rows), pos[rows], repl, batch_size, bar)
            clean_logits.append(clean)
            for c in comps:
                abl_logits[c].append(ablated[c])
            for cost in [1.0] + costs:
                forwards += cost * len(rows) / n
    finally:
        bar.close()
    clean = metric_means(torch.cat(clean_logits), task_data, metrics)
    ablated = {c: metric_means(torch.cat(abl_logits[c]), task_data, metrics) for c in comps}
    return SweepResult(clean, ablated, method, time.perf_counter() - t0, forwards, per_position, position,
                       n, fast)



def sweep_components(model, task_data: TaskData, components: Sequence[Component], *, method: str = "mean",
                     position: str = "last", batch_size: int = 64, progress: bool | None = None) -> SweepResult:
    """``ablation_sweep`` of ``components`` with every metric, fast where the model allows it (the layer
    replay needs a plain final norm and unembedding: encoders, and models it cannot reproduce, run the
    plain path). This is the sweep ``compare`` and ``discover_and_match`` run, so one serves both."""
    kw = dict(method=method, position=position, batch_size=batch_size, progress=progress)
    if model.is_encoder:
        return ablation_sweep(model, task_data, components, fast=False, **kw)
    try:
        return ablation_sweep(model, task_data, components, fast=True, **kw)
    except FastSweepUnsupported:
        return ablation_sweep(model, task_data, components, fast=False, **kw)

def _replayed_chunk(model, b: Batch, pos: torch.Tensor, repl: dict[Component, torch.Tensor], batch_size: int, bar
                    ) -> tuple[torch.Tensor, dict[Component, torch.Tensor], list[float]]:
    """The fast path on one chunk of rows ``b``: clean logits ``[n, vocab]``, the logits ``[n, vocab]``
    with each component of ``repl`` (``comp -> [n, seq, d]``) replaced alone, and the costs of the
    runs after the clean one, in forwards over the chunk."""
    replay = LayerReplay(model, b, pos)
    comps = list(repl)
    outs, cost = replay_items(model, replay, [(c, (lambda c=c: repl[c])) for c in comps],
                              batch_size=batch_size, bar=bar)
    return replay.logits.cpu(), dict(zip(comps, outs)), [cost]


@torch.no_grad()
def _forwarded_chunk(model, b: Batch, pos: torch.Tensor, repl: dict[Component, torch.Tensor], batch_size: int, bar
                     ) -> tuple[torch.Tensor, dict[Component, torch.Tensor], list[float]]:
    """The plain path on one chunk: one full forward per component (``intervene``; the unembedding at the
    positions only), same returns."""
    b = b.to(model.device)

    def run() -> torch.Tensor:
        return answer_logits(model, b.input_ids, b.attention_mask, pos).float().cpu()

    clean = run()
    ablated = {}
    for c in repl:
        with intervene(model, {c: repl[c]}):
            ablated[c] = run()
        bar.update(1)
    return clean, ablated, [1.0] * len(repl)
