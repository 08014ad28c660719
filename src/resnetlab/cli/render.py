"""Console output of the CLI: tables through rich, CSV and JSON for machines."""

from __future__ import annotations

import csv
import json
import sys

from rich.console import Console
from rich.table import Table


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    table = Table(title=title, show_lines=False)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=max(120, Console().width)).print(table)


def print_predictions(results, output_format: str) -> None:
    ok = [r for r in results if not r.error]
    if output_format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif output_format == "csv":
        writer = csv.writer(sys.stdout)
        k = max((len(r.classes) for r in ok), default=0)
        writer.writerow(["path"] + [f"{field}{i + 1}" for i in range(k) for field in ("class", "class_id", "confidence")])
        for r in ok:
            writer.writerow([r.path] + [v for c, cid, p in zip(r.classes, r.class_ids, r.confidences) for v in (c, cid, f"{p:.6f}")])
    else:
        table = Table(show_lines=False)
        for header in ("image", "prediction", "confidence", "next best"):
            table.add_column(header)
        for r in ok:
            others = ", ".join(f"{c} {p:.1%}" for c, p in zip(r.classes[1:], r.confidences[1:]))
            table.add_row(r.path, r.classes[0], f"{r.confidences[0]:.1%}", others)
        Console(width=max(140, Console().width)).print(table)
