"""Console output of the CLI: tables through rich, CSV and JSON for machines."""

from __future__ import annotations

import csv
import json
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    table = Table(title=title, show_lines=False)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=max(120, Console().width)).print(table)


def prediction_label(r, threshold: float | None = None) -> str:
    """The prediction column: the class, or for a withheld answer ``unknown (best guess: NAME 0.41 < 0.87)``."""
    if not r.unknown:
        return r.classes[0]
    below = f" < {threshold:.2f}" if threshold is not None else ""
    return f"unknown (best guess: {r.classes[0]} {r.confidence:.2f}{below})"


def print_predictions(results, output_format: str, answers: dict | None = None) -> None:
    """``results`` (deployment Predictions) as a table, CSV or JSON on stdout; ``answers`` (the predictor's
    ``describe_answers()``) titles the table with the temperature and operating point."""
    ok = [r for r in results if not r.error]
    if output_format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        k = max((len(r.classes) for r in ok), default=0)
        # the columns of earlier versions first, so that scripts reading them by position keep working
        writer.writerow(["path"] + [f"{field}{i + 1}" for i in range(k) for field in ("class", "class_id", "confidence")]
                        + ["unknown", "reason", "energy"])
        for r in ok:
            writer.writerow([r.path] + [v for c, cid, p in zip(r.classes, r.class_ids, r.confidences) for v in (c, cid, f"{p:.6f}")]
                            + [""] * (3 * (k - len(r.classes)))
                            + [int(r.unknown), r.reason or "", "" if r.energy is None else f"{r.energy:.6f}"])
    else:
        threshold = ((answers or {}).get("operating_point") or {}).get("threshold")
        table = Table(show_lines=False, caption=_caption(answers))
        for header in ("image", "prediction", "confidence", "energy", "next best"):
            table.add_column(header)
        for r in ok:
            others = ", ".join(f"{c} {p:.1%}" for c, p in zip(r.classes[1:], r.confidences[1:]))
            label = Text(prediction_label(r, threshold), style="dim" if r.unknown else "")
            table.add_row(r.path, label, f"{r.confidences[0]:.1%}",
                          "" if r.energy is None else f"{r.energy:.2f}", others)
        Console(width=max(140, Console().width)).print(table)


def _caption(answers: dict | None) -> str | None:
    if not answers:
        return None
    temperature = answers.get("temperature")
    point = answers.get("operating_point") or {}
    calibrated = f"confidences calibrated at temperature {temperature:.3g}" if temperature else "raw confidences"
    if point.get("rule") == "accept_all":
        return f"{calibrated}; every answer accepted"
    return f"{calibrated}; unknown below {point.get('threshold', 0):.3f} ({point.get('description', '')})"
