"""The run: its folder and outputs, the logger, the progress display, a sweep's report, secrets kept out."""

from embtune.run.logger import RunLogger
from embtune.run.outputs import NeverOverwrite
from embtune.run.sweep_report import SweepTable

__all__ = ["NeverOverwrite", "RunLogger", "SweepTable"]
