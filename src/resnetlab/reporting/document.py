"""A tiny document model rendered to both Markdown and one self-contained HTML file.

Reports are built once as a list of blocks (headings, paragraphs, lists, tables, figures) and rendered twice, so
``report.md`` and ``report.html`` always carry the same content. Text supports two inline marks only,
```code``` and ``**bold**``. In HTML every figure is embedded as a base64 ``data:`` URI and all styling is
inline, so the page opens offline and makes no network requests.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from resnetlab.utils.io import atomic_write_text


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class BulletList:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    #: Per column "left" or "right"; numbers read best right-aligned.
    align: list[str] | None = None


@dataclass
class Figure:
    path: Path
    caption: str
    #: Stable id for the HTML element, so tests and links can find the figure.
    key: str
    #: Show at native resolution in HTML (scrolling sideways) instead of shrinking to the page width, for dense
    #: figures such as a 43-class confusion matrix whose labels must stay readable.
    full_size: bool = False


Block = Heading | Paragraph | BulletList | Table | Figure


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _markdown_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_INLINE_CODE = re.compile(r"`([^`]+)`")
_INLINE_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    escaped = html.escape(str(text), quote=False)
    escaped = _INLINE_CODE.sub(r"<code>\1</code>", escaped)
    return _INLINE_BOLD.sub(r"<strong>\1</strong>", escaped)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1180px;
padding:1.5rem 2rem 4rem;color:#1d232a;line-height:1.45}
h1{border-bottom:2px solid #3465a4;padding-bottom:.3rem}h2{margin-top:2.4rem;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.8rem 0;font-size:.88rem}th,td{border:1px solid #cfd6de;padding:.25rem .55rem}
th{background:#eef2f7;text-align:left}tr:nth-child(even) td{background:#f8fafc}td.num{text-align:right;
font-variant-numeric:tabular-nums}code{background:#f1f3f5;padding:0 .25rem;border-radius:3px;font-size:.9em}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #e2e6ea}
figure.full-size{overflow-x:auto}figure.full-size img{max-width:none}
figcaption{font-size:.9rem;color:#48525c;margin-top:.3rem}nav.toc{background:#f6f8fa;padding:.6rem 1rem;
border-radius:6px;font-size:.9rem}nav.toc a{margin-right:1rem;white-space:nowrap}
"""

# Counts the figures the browser actually decoded, so a headless-browser test can tell a rendered image from a
# broken one by reading two attributes from the DOM.
_FIGURE_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-figures-total", images.length);
  document.body.setAttribute("data-figures-rendered",
    images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length);
});
"""


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(Paragraph(text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(BulletList(list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str] | None = None):
        self.blocks.append(Table(list(headers), [[str(cell) for cell in row] for row in rows],
                                 list(align) if align else None))

    def figure(self, path: Path | None, caption: str, key: str, *, full_size: bool = False) -> None:
        """Add a figure if its image exists (plots that could not be drawn are simply left out)."""
        if path is not None and Path(path).is_file():
            self.blocks.append(Figure(Path(path), caption, key, full_size))

    # ------------------------------------------------------------------ Markdown
    def to_markdown(self, base_dir: Path) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                lines += ["#" * block.level + " " + block.text, ""]
            elif isinstance(block, Paragraph):
                lines += [block.text, ""]
            elif isinstance(block, BulletList):
                lines += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                align = block.align or ["left"] * len(block.headers)
                lines.append("| " + " | ".join(_markdown_cell(h) for h in block.headers) + " |")
                lines.append("|" + "|".join("---:" if a == "right" else "---" for a in align) + "|")
                lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            elif isinstance(block, Figure):
                image_path, base = Path(block.path).resolve(), Path(base_dir).resolve()
                # Relative links keep the Markdown valid when the run directory is moved or copied.
                link = image_path.relative_to(base).as_posix() if image_path.is_relative_to(base) else str(image_path)
                lines += [f"![{block.caption}]({link})", "", f"*{block.caption}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    # ------------------------------------------------------------------ HTML
    def to_html(self) -> str:
        parts: list[str] = []
        toc = [(block.text, _slug(block.text)) for block in self.blocks
               if isinstance(block, Heading) and block.level == 2]
        for block in self.blocks:
            if isinstance(block, Heading):
                level = min(max(block.level, 2), 6)
                parts.append(f'<h{level} id="{_slug(block.text)}">{_inline_html(block.text)}</h{level}>')
            elif isinstance(block, Paragraph):
                parts.append(f"<p>{_inline_html(block.text)}</p>")
            elif isinstance(block, BulletList):
                items = "".join(f"<li>{_inline_html(item)}</li>" for item in block.items)
                parts.append(f"<ul>{items}</ul>")
            elif isinstance(block, Table):
                align = block.align or ["left"] * len(block.headers)
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.headers)
                body = "".join(
                    "<tr>" + "".join(
                        f'<td class="num">{_inline_html(c)}</td>' if a == "right" else f"<td>{_inline_html(c)}</td>"
                        for c, a in zip(row, align)) + "</tr>"
                    for row in block.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Figure):
                encoded = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
                caption = _inline_html(block.caption)
                wide = ' class="full-size"' if block.full_size else ""
                parts.append(
                    f'<figure id="fig-{html.escape(block.key)}"{wide}><img src="data:image/png;base64,{encoded}" '
                    f'alt="{html.escape(block.caption)}"><figcaption>{caption}</figcaption></figure>')
        nav = ""
        if toc:
            nav = '<nav class="toc">' + "\n".join(f'<a href="#{slug}">{html.escape(text)}</a>'
                                                for text, slug in toc) + "</nav>"
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>"
            f"<script>{_FIGURE_CHECK_SCRIPT}</script></head>\n<body>"
            f"<h1>{html.escape(self.title)}</h1>{nav}\n" + "\n".join(parts) + "\n</body></html>\n"
        )

    def write(self, markdown_path: Path, html_path: Path) -> tuple[Path, Path]:
        atomic_write_text(markdown_path, self.to_markdown(Path(markdown_path).parent))
        atomic_write_text(html_path, self.to_html())
        return Path(markdown_path), Path(html_path)
