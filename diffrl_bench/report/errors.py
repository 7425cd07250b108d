"""The report's errors: each message names the directory, file, column or arm at fault."""
from __future__ import annotations


class ReportError(ValueError):
    """A results directory that cannot be reported on; the message names the directory, column or arm."""


class NoRunsError(ReportError):
    """No run directory (a folder with `metrics.csv`) under the results directory."""


class MissingColumnError(ReportError):
    """A run lacks a column the report needs (the headline metric or a cost column)."""


class UnknownArmError(ReportError):
    """`--baseline` names an arm that is not in the results directory."""
