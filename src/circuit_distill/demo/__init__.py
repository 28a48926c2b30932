"""The main job on the embedded default: circuit distillation of the project-trained entity-tracking
teacher into the warm student, every method of the paper's table, several seeds, one report.

``experiment`` defines the experiment (settings, rows, data); ``run`` runs it through the public API;
``tables`` and ``report`` turn its runs into tables, figures and ``report.html``."""

from ..study.protocol import TEACHER
from .experiment import (
    EXTRA_MATCHERS,
    IIT_ROWS,
    OUR_MATCHERS,
    PAPER_ROWS,
    STUDENT,
    DemoConfig,
    demo_rows,
)
from .report import write_demo_report
from .run import run_demo
from .tables import format_table, summarise_rows

__all__ = ["DemoConfig", "EXTRA_MATCHERS", "IIT_ROWS", "OUR_MATCHERS", "PAPER_ROWS", "STUDENT", "TEACHER", "demo_rows",
           "format_table", "run_demo", "summarise_rows", "write_demo_report"]
