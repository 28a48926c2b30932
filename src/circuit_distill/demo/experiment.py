"""The demo's experiment definition: its settings (``DemoConfig``), its rows and its data.

Protocol (fixed before comparing rows): the same training prompts, the same number of steps, the same
learning rate and the same trainable subset for every row (by default the matched student heads' query
rows and output-projection columns; see ``DemoConfig.trainable`` and ``train_kv``); only the objective
(and, for the ``@hungarian`` / ``@cka`` rows, the component map) changes. ``ce@all`` trains every
parameter with CE as a reference. Each seed changes the data order of every row alike (the seed is
shared by the rows), never the data itself.

The map (``grid``, on by default): the study's rows ``GRID_ROWS`` for every warmth level x trainable scope of
``grid_students`` x ``grid_trainable``, with the demo's protocol (``grid_config``), run by the study's runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from ..config import option
from ..errors import ConfigError
from ..study.config import SCOPES, StudyConfig, parse_row
from ..study.protocol import ProtocolConfig

STUDENT = "builtin:entity-tracking-student"
# the demo's map (``DemoConfig.grid``): a reduced grid of the controlled study (``circuit-distill study``)
GRID_STUDENTS = {"cold": "builtin:entity-tracking-student-cold", "partial": STUDENT}
GRID_TRAINABLE = ("matched_heads", "all")
GRID_ROWS = ("ce", "ce+random_cka", "ce+align_cka")
# settings the demo's own runs do not depend on: the grid's, and how many processes run the table
GRID_KEYS = ("grid", "grid_students", "grid_trainable", "grid_rows", "grid_n_eval", "grid_jobs", "jobs")
# row name -> (objective preset, component-map key, trainable subset). For ``ce+random_cka`` the
# trainer keeps the map's student heads (so the trainable subset is the same) and pairs each with a
# seeded random teacher circuit head.
PAPER_ROWS: dict[str, tuple[str, str, str]] = {
    "ce": ("ce", "ablation", "matched_heads"),
    "kd": ("kd", "ablation", "matched_heads"),
    "ce+random_cka": ("ce+random_cka", "ablation", "matched_heads"),
    "ce+align_cka": ("ce+align_cka", "ablation", "matched_heads"),
    "align_cka": ("align_cka", "ablation", "matched_heads"),
    "ce@all": ("ce", "ablation", "all"),
}
# the interchange-intervention rows (``--set iit_rows=true``): row -> (objective, map key, trainable,
# extra DistillConfig settings); ``ce+iit@self`` is the sanity row (sources that cannot change the answer)
IIT_ROWS: dict[str, tuple[str, str, str, dict]] = {
    "ce+iit": ("ce+iit", "ablation", "matched_heads", {}),
    "ce+random_iit": ("ce+random_iit", "ablation", "matched_heads", {}),
    "ce+iit+align_cka": ("ce+iit+align_cka", "ablation", "matched_heads", {}),
    "ce+iit@self": ("ce+iit", "ablation", "matched_heads", {"iit_counterpart": "self"}),
}
OUR_MATCHERS = ("hungarian", "cka")  # the default extra rows
EXTRA_MATCHERS = (*OUR_MATCHERS, "ablation_norm")  # ablation_norm: the paper's rule on per-model normalised effects
REPORT_ROW = "ce+align_cka"  # the row whose first seed's comparison the report draws


@dataclass
class DemoConfig(ProtocolConfig):
    """Everything that defines the demo's experiment: the protocol it shares with the study
    (``ProtocolConfig``) and its own rows and circuits. Change it here or with ``--set key=value``."""

    label = "demo setting"

    student: str = option(STUDENT, "the student to distil into (a fresh copy for every run)")
    positions: str = option("all", "alignment rows: 'all' real tokens, 'last', or a task position's name")
    circuit: str = option("top_k", "each model's circuit: 'top_k' heads by mean-ablation effect, or 'pruned'")
    circuit_threshold: float = option(0.2, "pruning cost threshold (fraction of the metric) with circuit='pruned'")
    extra_matchers: list[str] = option(help=f"extra ce+align_cka rows by matcher, from {', '.join(EXTRA_MATCHERS)}",
                                       factory=lambda: list(OUR_MATCHERS))
    trainable: str = option("matched_heads", "what every row but ce@all trains: 'matched_heads' (the "
                            "paper's q rows and o columns of the mapped student heads) or 'attention'")
    train_kv: bool = option(False, "with matched_heads, also train the mapped heads' GQA key/value groups")
    iit_rows: bool = option(False, "add the interchange-intervention rows (ce+iit, ce+random_iit, "
                            "ce+iit+align_cka, ce+iit@self) and IIA of the paper's pairs before and after")
    grid: bool = option(True, "also run the map: a reduced grid of the controlled study (warmth x trainable "
                        "scope x grid_rows, the demo's seeds and protocol) into <out>/grid")
    grid_students: dict = option(help="the grid's warmth levels: name -> warm student, coldest first",
                                 factory=lambda: dict(GRID_STUDENTS))
    grid_trainable: list[str] = option(help=f"the grid's trainable scopes, from {', '.join(SCOPES)}",
                                       factory=lambda: list(GRID_TRAINABLE))
    grid_rows: list[str] = option(help="the grid's rows (study row names; ce is always run)",
                                  factory=lambda: list(GRID_ROWS))
    grid_n_eval: int = option(1000, "prompts in each of the grid's held-out sets (its bootstrap CIs resample them)")
    grid_jobs: int = option(2, "worker processes of the grid (the study runner's --jobs)")
    jobs: int = option(2, "worker processes of the table's runs (one torch thread each; 1: in this process)")

    def validate(self) -> None:
        super().validate()
        unknown = [m for m in self.extra_matchers if m not in EXTRA_MATCHERS]
        if unknown:
            raise ConfigError(f"unknown demo matcher(s) {', '.join(map(repr, unknown))} in extra_matchers; "
                              f"choose from {', '.join(EXTRA_MATCHERS)}")
        if self.circuit not in ("top_k", "pruned"):
            raise ConfigError(f"demo setting circuit must be 'top_k' or 'pruned', got {self.circuit!r}")
        if self.trainable not in ("matched_heads", "attention"):
            raise ConfigError(f"demo setting trainable must be 'matched_heads' or 'attention', got {self.trainable!r} "
                              "(the ce@all row already trains everything)")
        if not self.seeds:
            raise ConfigError("demo setting seeds is empty: give at least one seed, e.g. --seeds 3")
        self.validate_grid()

    def validate_grid(self) -> None:
        for key in ("grid_students", "grid_trainable", "grid_rows"):
            if not getattr(self, key):
                raise ConfigError(f"demo setting {key} is empty: give at least one, or --set grid=false")
        bad = [s for s in self.grid_trainable if s not in SCOPES]
        if bad:
            raise ConfigError(f"unknown grid_trainable scope(s) {', '.join(map(repr, bad))}; choose from {', '.join(SCOPES)}")
        for row in self.grid_rows:
            parse_row(row)
        for key in ("grid_n_eval", "grid_jobs", "jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"demo setting {key} must be >= 1, got {getattr(self, key)}")
        self.grid_config()  # and the study's own checks

    def run_settings(self) -> dict:
        """The settings the demo's own runs depend on: all but the grid's (``GRID_KEYS``), as JSON values."""
        return {k: v for k, v in json.loads(json.dumps(self.to_dict())).items() if k not in GRID_KEYS}

    def grid_config(self) -> StudyConfig:
        """The study the map runs: the demo's protocol (teacher, seeds, steps, learning rate, prompt sets; the
        held-out sets ``grid_n_eval`` prompts long), its alignment positions, and the grid's warmth levels,
        trainable scopes and rows. Circuits are the top ``circuit_top_k`` heads, as in the study."""
        shared = {f.name: getattr(self, f.name) for f in fields(ProtocolConfig)}
        return StudyConfig(**{**shared, "n_eval": self.grid_n_eval, "students": dict(self.grid_students),
                              "trainable": list(self.grid_trainable), "positions": [self.positions],
                              "rows": list(self.grid_rows)})


def demo_rows(cfg: DemoConfig, maps: dict) -> dict[str, tuple[str, str, str, dict]]:
    """Row name -> (objective, map key, trainable subset, extra DistillConfig settings): the paper's rows,
    one ``ce+align_cka@<matcher>`` row per extra matcher whose map differs from the paper's, then the
    interchange-intervention rows if ``cfg.iit_rows``."""
    scoped = lambda subset: cfg.trainable if subset == "matched_heads" else subset
    rows = {name: (obj, key, scoped(subset), {}) for name, (obj, key, subset) in PAPER_ROWS.items()}
    for m in cfg.extra_matchers:
        if m in maps and maps[m].pairs != maps["ablation"].pairs:
            rows[f"ce+align_cka@{m}"] = ("ce+align_cka", m, cfg.trainable, {})
    if cfg.iit_rows:
        rows.update({name: (obj, key, scoped(subset), dict(extra)) for name, (obj, key, subset, extra) in IIT_ROWS.items()})
    return rows
