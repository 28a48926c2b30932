"""The main job on the embedded default: circuit distillation of the project-trained entity-tracking
teacher into the warm student, every method of the paper's table, several seeds, one report; and the map,
a reduced grid of the controlled study (student warmth x trainable scope) beside it.

``experiment`` defines the experiment (settings, rows, data); ``run`` runs it through the public API;
``grid`` runs the map through the study's runner; ``tables`` and ``report`` turn the runs into tables,
figures and ``report.html``."""

from ..study.protocol import TEACHER
from .experiment import (
    EXTRA_MATCHERS,
    GRID_ROWS,
    GRID_STUDENTS,
    GRID_TRAINABLE,
    IIT_ROWS,
    OUR_MATCHERS,
    PAPER_ROWS,
    STUDENT,
    DemoConfig,
    demo_rows,
)
from .grid import grid_summary, run_grid
from .report import write_demo_report
from .run import run_demo
from .tables import format_table, summarise_rows

__all__ = ["DemoConfig", "EXTRA_MATCHERS", "GRID_ROWS", "GRID_STUDENTS", "GRID_TRAINABLE", "IIT_ROWS", "OUR_MATCHERS",
           "PAPER_ROWS", "STUDENT", "TEACHER", "demo_rows", "format_table", "grid_summary", "run_demo", "run_grid",
           "summarise_rows", "write_demo_report"]
