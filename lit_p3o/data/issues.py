"""Bad rows: an error that names them (strict) or a counted, logged skip (lenient)."""

from __future__ import annotations

import logging
from collections import defaultdict

log = logging.getLogger("lit_p3o.data")


class DataFormatError(ValueError):
    """A row that cannot be used, named by origin, row number and field."""


class RowIssues:
    """Collects bad rows of one source. Rows are numbered from 0 in the order read."""

    def __init__(self, origin: str, strict: bool, examples: int = 5) -> None:
        self.origin = origin
        self.strict = strict
        self.examples = examples
        self.rows: dict[str, list[int]] = defaultdict(list)

    def add(self, row: int, field: str, reason: str) -> None:
        """Raise in strict mode; otherwise remember the row under its reason."""
        if self.strict:
            raise DataFormatError(f"{self.origin}: row {row}: field `{field}`: {reason}")
        self.rows[f"{field}: {reason}"].append(row)

    @property
    def skipped(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def report(self, total: int) -> None:
        """One warning summarising every skip, with the first few row numbers per reason."""
        if not self.skipped:
            return
        parts = [
            f"{len(rows)} × {reason} (rows {', '.join(map(str, rows[: self.examples]))}"
            f"{', …' if len(rows) > self.examples else ''})"
            for reason, rows in self.rows.items()
        ]
        log.warning("skipped %d of %d rows of %s: %s", self.skipped, total, self.origin, "; ".join(parts))
