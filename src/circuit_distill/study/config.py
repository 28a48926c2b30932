"""The study's settings (``StudyConfig``, loaded from YAML) and its rows: what each row trains with.

A *row* is one training recipe: an objective (``distill.objectives``), the pairing of its alignment term
and, for the controls, what replaces the teacher's paired activations. Rows named ``<objective>@<matcher>``
use that matcher's component map; every other aligned row uses the paper's (``ablation``) map, and so do
the three controls, which keep the map's student heads (so the trainable subset is the same):

- ``ce+random_cka``: each student head paired with a seeded random teacher head (random pairs);
- ``ce+shuffled_cka``: the matched pairs, each prompt's student rows against the teacher's rows of another
  prompt of the batch with the same length (shuffled examples: same statistics, no per-example binding);
- ``ce+untrained_cka``: the matched pairs, against a teacher of the same architecture re-initialised from
  ``untrained_seed`` (CE labels still from the trained teacher).

Rows with an interchange-intervention term (``ce+iit``, ``ce+iit+align_cka``, ...; ``distill.iit``) intervene on
the same map's pairs, with the study's ``iit_*`` settings, at the cell's positions; their controls:

- ``ce+random_iit``: each student head intervened with a seeded random teacher head (random pairs);
- ``<iit objective>@self`` / ``@same_answer`` (sanity rows): the matched pairs, each prompt interchanged with
  itself or with another prompt of the same answer, so the interventions should not change the teacher's answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import option
from ..distill.config import IIT_CHOICES
from ..distill.objectives import get_objective
from ..errors import ConfigError
from ..matching.pipeline import MATCHERS
from .protocol import ProtocolConfig


@dataclass(frozen=True)
class Row:
    """One row of the study: ``objective`` (a preset name), ``pairing`` (``-`` without alignment, a matcher,
    or a control: ``random``, ``shuffled``, ``untrained``), the component map it uses (``map_key``), the
    teacher rows it aligns with (``align_targets``), which teacher gives them (``teacher``) and, for a sanity
    row, the interchange counterpart it uses instead of the study's (``counterpart``)."""

    name: str
    objective: str
    pairing: str = "-"
    map_key: str = "ablation"
    align_targets: str = "paired"
    teacher: str = "trained"
    counterpart: str | None = None

    @property
    def aligns(self) -> bool:
        """True if the row has an alignment term."""
        return get_objective(self.objective).uses_align

    @property
    def uses_iit(self) -> bool:
        """True if the row has an interchange-intervention term."""
        return get_objective(self.objective).uses_iit

    @property
    def positioned(self) -> bool:
        """True if the row reads its pairs at the cell's positions (alignment or interventions), so the
        positions are one of its factors."""
        return self.aligns or self.uses_iit

    @property
    def is_control(self) -> bool:
        """True for the control rows: ``CONTROLS``, ``IIT_CONTROLS`` and the sanity rows."""
        return (self.name in CONTROLS.values() or self.objective in IIT_CONTROLS.values()
                or self.counterpart is not None)


CONTROLS = {"random": "ce+random_cka", "shuffled": "ce+shuffled_cka", "untrained": "ce+untrained_cka"}
IIT_CONTROLS = {"random_iit": "ce+random_iit"}
SANITY_SOURCES = ("self", "same_answer")  # counterparts whose interventions should not change the answer
FIXED_ROWS = {
    "ce+random_cka": Row("ce+random_cka", "ce+random_cka", "random"),
    "ce+shuffled_cka": Row("ce+shuffled_cka", "ce+align_cka", "shuffled", align_targets="shuffled"),
    "ce+untrained_cka": Row("ce+untrained_cka", "ce+align_cka", "untrained", teacher="untrained"),
}
# settings that choose which runs the grid holds, and settings of the analysis only: changing them keeps
# every finished run valid (a rerun with more seeds or fewer rows continues), unlike every other setting
GRID_KEYS = ("students", "trainable", "positions", "rows", "row_positions", "seeds")
ANALYSIS_KEYS = ("n_boot", "ci_level", "goal_margin", "goal_trained_fraction", "goal_iia_margin", "threads")
# run settings added after the first studies: a directory saved without one holds runs made as with its default
LATER_KEYS = ("iit_counterpart", "iit_pairs", "iit_loss", "iit_lam", "iia", "task")
SCOPES = {"matched_heads": ("matched_heads", False), "matched_heads+kv": ("matched_heads", True),
          "attention": ("attention", False), "all": ("all", False)}


def parse_row(name: str) -> Row:
    """The ``Row`` called ``name``: a control (``FIXED_ROWS``), or ``<objective>`` / ``<objective>@<matcher>``."""
    if name in FIXED_ROWS:
        return FIXED_ROWS[name]
    objective, _, matcher = name.partition("@")
    obj = get_objective(objective)
    if obj.pairs == "random":
        if matcher:
            raise ConfigError(f"study row {name!r}: random pairs take no matcher; write {obj.name!r}")
        return Row(name, obj.name, "random")
    if obj.uses_iit and matcher in SANITY_SOURCES:
        return Row(name, obj.name, "ablation", counterpart=matcher)
    if matcher and matcher not in MATCHERS:
        sanity = f" or a sanity source from {', '.join(SANITY_SOURCES)}" if obj.uses_iit else ""
        raise ConfigError(f"study row {name!r}: unknown matcher {matcher!r}; choose from {', '.join(MATCHERS)}{sanity}")
    if matcher and not obj.uses_pairs:
        raise ConfigError(f"study row {name!r}: {obj.name!r} has no alignment term to pair; drop '@{matcher}'")
    if not obj.uses_pairs:
        return Row(name, obj.name)
    return Row(name, obj.name, matcher or "ablation", map_key=matcher or "ablation")


@dataclass
class StudyConfig(ProtocolConfig):
    """Everything that defines a study (docs/study/PROTOCOL.md): the shared protocol (``ProtocolConfig``: teacher,
    budget, prompt sets), the grid and the analysis. Load it with ``load_config(StudyConfig, path)``."""

    label = "study setting"

    students: dict = option(help="warmth level -> warm student (same tokenizer as the teacher), coldest first",
                            factory=lambda: {"cold": "builtin:entity-tracking-student-cold",
                                             "partial": "builtin:entity-tracking-student",
                                             "competent": "builtin:entity-tracking-student-competent"})
    trainable: list[str] = option(help=f"trainable scopes, from {', '.join(SCOPES)}",
                                  factory=lambda: ["matched_heads", "matched_heads+kv", "attention", "all"])
    positions: list[str] = option(help="alignment positions: 'all', 'last' or task position names",
                                  factory=lambda: ["all", "last", "query_label"])
    rows: list[str] = option(help="rows run in every cell (ce is always run: every gain is over it)",
                             factory=lambda: ["ce", "ce+align_cka", *CONTROLS.values()])
    row_positions: dict = option(help="row -> the only alignment positions it runs at (default: all of them)",
                                 factory=dict)
    seeds: list[int] = option(help="seeds; each changes the batch order of every row alike",
                              factory=lambda: [0, 1, 2, 3, 4])
    n_eval: int = option(1000, "prompts in each held-out set (final accuracies and the bootstrap)")
    n_curve: int = option(250, "first prompts of each held-out set evaluated along the way (the curves)")
    targets: list[float] = option(help="accuracies (harder split) whose first step is reported",
                                  factory=lambda: [0.3, 0.5])
    untrained_seed: int = option(0, "initialisation seed of the untrained teacher")
    n_boot: int = option(2000, "bootstrap resamples of every CI")
    ci_level: float = option(0.95, "level of every CI")
    goal_margin: float = option(0.05, "gain over ce and over every control the goal asks for")
    goal_trained_fraction: float = option(0.2, "largest trained fraction of the student for the goal")
    goal_iia_margin: float = option(0.1, "IIT rows' goal: IIA gain over the random-pairs control it asks for")
    iit_counterpart: str = option("corrupted", "IIT rows and IIA: the prompt each prompt is interchanged with "
                                  "(distill.iit; a sanity row '<row>@self' uses its own)")
    iit_pairs: str = option("one", "IIT rows: pairs intervened on per step: one (seeded choice) | all (jointly)")
    iit_loss: str = option("kl", "IIT rows: kl (T^2 KL) | ce (on the teacher's intervened argmax)")
    iit_lam: float = option(1.0, "IIT rows: weight of the IIT term")
    iia: bool = option(False, "measure the IIA of the paper's matched pairs before and after every run")
    threads: int = option(0, "torch CPU threads per process (0: torch's default)")

    def validate(self) -> None:
        super().validate()
        self.row_specs()  # every row name parses
        bad = [s for s in self.trainable if s not in SCOPES]
        if bad:
            raise ConfigError(f"unknown trainable scope(s) {', '.join(map(repr, bad))}; choose from {', '.join(SCOPES)}")
        for key in ("students", "trainable", "positions", "seeds", "rows"):
            if not getattr(self, key):
                raise ConfigError(f"study setting {key} is empty: give at least one")
        unknown = [r for r in self.row_positions if r not in self.rows]
        if unknown:
            raise ConfigError(f"row_positions names rows not in rows: {', '.join(unknown)}")
        for k in ("steps", "batch_size", "n_train", "n_eval", "n_curve", "n_discovery", "n_boot", "circuit_top_k"):
            if getattr(self, k) < 1:
                raise ConfigError(f"study setting {k} must be >= 1, got {getattr(self, k)}")
        if not 0 < self.ci_level < 1:
            raise ConfigError(f"ci_level must be in (0, 1), got {self.ci_level}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds repeat: {self.seeds}")
        for key, allowed in IIT_CHOICES.items():
            if key in LATER_KEYS and getattr(self, key) not in allowed:
                raise ConfigError(f"study setting {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not (math.isfinite(self.iit_lam) and self.iit_lam >= 0):
            raise ConfigError(f"study setting iit_lam must be a finite number >= 0, got {self.iit_lam}")

    def run_settings(self) -> dict:
        """The settings every run depends on: all but ``GRID_KEYS`` and ``ANALYSIS_KEYS``."""
        return {k: v for k, v in self.to_dict().items() if k not in GRID_KEYS + ANALYSIS_KEYS}

    def row_specs(self) -> dict[str, Row]:
        """Row name -> ``Row``, ``ce`` first (every gain is measured over it)."""
        names = ["ce"] + [r for r in self.rows if r != "ce"]
        return {n: parse_row(n) for n in names}

    def positions_of(self, row: Row) -> list[str]:
        """The positions ``row`` runs at (``["-"]`` for a row without alignment or interventions)."""
        if not row.positioned:
            return ["-"]
        return [str(p) for p in self.row_positions.get(row.name, self.positions)]

    def controls_of(self, row: Row) -> dict[str, str]:
        """Control label -> row name of the study's controls of ``row``: the CKA controls of a row with
        alignment, the random-pairs IIT control and the sanity rows of its objective for a row with interventions."""
        specs, out = self.row_specs(), {}
        if row.aligns:
            out.update({c: n for c, n in CONTROLS.items() if n in specs})
        if row.uses_iit:
            out.update({c: n for c, n in IIT_CONTROLS.items() if n in specs})
            out.update({f"sanity_{s.counterpart}": n for n, s in specs.items()
                        if s.counterpart is not None and s.objective == row.objective})
        return out

    @classmethod
    def later_default(cls, key: str):
        """The default of setting ``key`` (one of ``LATER_KEYS``): what runs saved before it existed used."""
        return cls.__dataclass_fields__[key].default
