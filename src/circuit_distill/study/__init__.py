"""The controlled study (issue 17, docs/study/PROTOCOL.md): where does circuit distillation transfer a
mechanism? A grid of distillation runs over student warmth, trainable scope, pairing (with the random-pairs,
shuffled-examples and untrained-teacher controls), alignment positions and objective, several seeds each;
the transfer check of every distilled student; paired-bootstrap CIs; ``results.json`` and ``report.html``.

``protocol`` holds what the study shares with the demo, ``config`` defines a study and its rows, ``grid`` its runs and cells, ``context`` what the runs share,
``runner`` one run and the kill-safe loop over them, ``run`` the whole study, ``transfer`` the role
similarity of matched heads, ``stats`` the bootstrap, ``results`` the summary and ``report`` the page."""

from .config import CONTROLS, SCOPES, Row, StudyConfig, parse_row
from .context import StudyContext
from .grid import Cell, RunKey, study_cells, study_runs
from .protocol import ProtocolConfig
from .report import study_sections, write_study_report
from .run import run_study, write_results
from .runner import finished, run_one, work
from .stats import Gain, paired_gain
from .transfer import Roles, role_similarity, transfer_check

__all__ = ["CONTROLS", "Cell", "Gain", "Roles", "Row", "SCOPES", "StudyConfig", "StudyContext", "RunKey",
           "ProtocolConfig", "finished", "paired_gain", "parse_row", "role_similarity", "run_one", "run_study",
           "study_cells", "study_runs", "study_sections", "write_study_report", "transfer_check", "work", "write_results"]
