"""MkDocs hook: the page ``reference/cli.md``, generated at build time from the Typer app of ``resnetlab``.

Every command and sub-command gets a section with its help, usage, arguments and options, read from the click
command that Typer builds (``typer.main.get_command``) through click's own API (``collect_usage_pieces``,
``get_params``, ``get_help_record``), which Typer's bundled click shares with click. So the reference cannot drift
from ``resnetlab --help``, and nothing but the source tree is needed to build it (no network, no extra plugin).
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PAGE = "reference/cli.md"
INTRO = """\
# Command line

Every command of `resnetlab`, generated from the command-line program itself when this site is built (so it is
what `resnetlab COMMAND --help` prints). Exit codes: 0 on success, 1 when some images of a `predict` could not be
read, 2 on bad usage or bad input, with one line on stderr naming the file, field or value at fault.
`KEY=VALUE` arguments set any key of the configuration (`optim.lr=0.05`, `data.input_size=64`); the recipes page
lists what the shipped recipes set.
"""


def _text(text: str) -> str:
    """Help text as Markdown: HTML and Markdown specials outside `code spans` escaped, so that `<recipe>` or
    `data.*` print as written."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 1:
            out.append(part)
        else:
            part = html.escape(part, quote=False)
            out.append(re.sub(r"([\\*_\[\]|#])", r"\\\1", part))
    return "".join(out)


def _section(command: Any, ctx: Any, path: list[str], level: int) -> str:
    """One command's section (and its sub-commands' after it)."""
    name = " ".join(path)
    lines = [f"{'#' * level} `{name}`", ""]
    if command.help:
        lines += [_text(command.help.strip()), ""]
    lines += ["```text", f"{name} {' '.join(command.collect_usage_pieces(ctx))}".rstrip(), "```", ""]
    arguments, options = [], []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        (arguments if param.param_type_name == "argument" else options).append(record)
    for title, records in (("Arguments", arguments), ("Options", options)):
        if records:
            lines += [f"**{title}**", ""]
            lines += [f"- `{names}`" + (f": {_text(help_text)}" if help_text else "") for names, help_text in records]
            lines.append("")
    if hasattr(command, "list_commands"):
        children = [(sub, command.get_command(ctx, sub)) for sub in command.list_commands(ctx)]
        children = [(sub, child) for sub, child in children if child is not None and not child.hidden]
        if children:
            lines += ["**Commands**", ""]
            lines += [f"- [`{sub}`](#{'-'.join([*path, sub]).replace(' ', '-')}): {_text(child.get_short_help_str(limit=120))}"
                      for sub, child in children]
            lines.append("")
        for sub, child in children:
            child_ctx = child.context_class(child, info_name=sub, parent=ctx)
            lines.append(_section(child, child_ctx, [*path, sub], min(level + 1, 4)))
    return "\n".join(lines)


def cli_reference_markdown() -> str:
    """The whole page, from ``resnetlab.cli.main.app``."""
    import typer.main

    from resnetlab.cli.main import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="resnetlab")
    return INTRO + "\n" + _section(root, ctx, ["resnetlab"], 2)


def on_config(config: Any) -> Any:
    """Document the source tree beside ``mkdocs.yml`` (as mkdocstrings does with ``paths: [src]``), not whatever
    copy of resnetlab happens to be installed."""
    src = str(Path(config.config_file_path).resolve().parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, PAGE, content=cli_reference_markdown()))
    return files
