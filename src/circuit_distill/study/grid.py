"""The study's grid: every run it trains (``RunKey``), in the order it trains them, and its cells.

A *cell* is one (warmth, trainable scope, alignment positions) setting; its rows are compared with each
other on the same data, steps, learning rate and seeds. A row without an alignment or intervention term
(``ce``, ``kd``) does not depend on the positions, so one run of it (positions ``-``) serves every cell of its warmth and
scope. Runs are ordered seed first, so an interrupted study has every cell at its first seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import StudyConfig

NO_POSITIONS = "-"


@dataclass(frozen=True)
class RunKey:
    """One training run of the study."""

    warmth: str
    trainable: str
    positions: str
    row: str
    seed: int

    @property
    def id(self) -> str:
        """A file name for the run: ``warmth.trainable.positions.row.sSEED``."""
        return f"{self.warmth}.{self.trainable}.{self.positions}.{self.row}.s{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One (warmth, trainable scope, alignment positions) setting of the grid."""

    warmth: str
    trainable: str
    positions: str

    def run_of(self, cfg: StudyConfig, row: str, seed: int) -> RunKey | None:
        """The run of ``row`` at ``seed`` that this cell uses (None if the row does not run at its positions)."""
        spec = cfg.row_specs()[row]
        pos = self.positions if spec.positioned else NO_POSITIONS
        if pos not in cfg.positions_of(spec):
            return None
        return RunKey(self.warmth, self.trainable, pos, row, seed)


def study_runs(cfg: StudyConfig) -> list[RunKey]:
    """Every run of the study, seed first, then warmth, scope, row and positions."""
    runs = []
    for seed in cfg.seeds:
        for warmth in cfg.students:
            for scope in cfg.trainable:
                for name, spec in cfg.row_specs().items():
                    runs += [RunKey(warmth, scope, p, name, seed) for p in cfg.positions_of(spec)]
    return runs


def study_cells(cfg: StudyConfig) -> list[Cell]:
    """Every cell of the grid, warmth first."""
    return [Cell(w, s, p) for w in cfg.students for s in cfg.trainable for p in cfg.positions]
