"""The documentation site builds with ``mkdocs build --strict``, offline, with every public API name and CLI command.

The docs tools (mkdocs, Material, mkdocstrings) are part of the ``dev`` extra (through ``docs``), so this test runs
wherever the test suite is installed as the README says; it skips with a reason only where someone installed the
test tools by hand without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs tools are absent: pip install -e '.[dev]' (or '.[docs]')")
pytest.importorskip("mkdocstrings", reason="the docs tools are absent: pip install -e '.[dev]' (or '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT, out)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_site_builds_strict_with_every_page(site):
    for page in ("index.html", "getting-started/index.html", "reference/cli/index.html", "reference/api/index.html",
                 "recipes/index.html", "benchmarks/index.html", "security/index.html", "architecture/index.html",
                 "workflows/gtsrb/index.html", "workflows/own-photos/index.html", "workflows/new-domain/index.html",
                 "workflows/deployment/index.html"):
        assert (site / page).is_file(), page


def test_site_loads_nothing_from_the_network(site):
    """No Google Fonts or other remote stylesheet, script or font: the site reads offline."""
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page
        remote = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?://[^"]+)"', text)
        assert not remote, (page, remote)


def test_api_reference_documents_every_public_name(site):
    from resnetlab import api

    text = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in api.__all__ if f'id="resnetlab.api.{name}"' not in text]
    assert not missing, f"docs/reference/api.md lacks ::: resnetlab.api.NAME for {missing}"


def test_cli_reference_has_every_command(site):
    import typer.main

    from resnetlab.cli.main import app

    text = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="resnetlab")
    for name in root.list_commands(ctx):
        assert f'id="resnetlab-{name}"' in text, name
    assert "--batch-size" in text and "Config overrides with dotted keys" in text


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """--strict is what catches a rotten link: a copy of the docs with one link to a missing page does not build."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "src").symlink_to(ROOT / "src")
    page = copy / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr
