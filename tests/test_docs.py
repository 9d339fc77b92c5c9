"""The documentation: the site builds with `mkdocs build --strict` (no broken link, anchor or image, every page
in the nav), and README.md, the front page, links every page of it, each link to a page and an anchor it has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, needs_extra

pytestmark = pytest.mark.slow  # a whole site build: about 10 s on 2 busy cores


def nav_pages(nav=None) -> list[str]:
    """The source files of mkdocs.yml's nav, in order (relative to docs/)."""
    if nav is None:
        nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def built_page(site: Path, page: str) -> Path:
    """Where MkDocs writes a page (its default use_directory_urls): training.md -> training/index.html."""
    stem = Path(page).with_suffix("")
    return site / ("index.html" if stem.name == "index" else stem / "index.html")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    needs_extra("docs", "mkdocs", "material", "mkdocs_jupyter")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    return out


def test_site_builds_strict_with_every_page_figure_and_the_notebook(site):
    pages = nav_pages()
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").iterdir() if p.suffix in (".md", ".ipynb"))
    assert sorted(pages) == on_disk  # every page is in the nav (strict also refuses a page left out of it)
    for page in pages:
        assert built_page(site, page).is_file(), page
    for figure in (ROOT / "docs").glob("*.png"):
        assert (site / figure.name).read_bytes() == figure.read_bytes()
    # The notebook, rendered from its committed outputs (never run at build): its figures and its test line.
    notebook = built_page(site, "walkthrough.ipynb").read_text()
    assert notebook.count("data:image/png;base64,") >= 2
    assert re.search(r"test_loss: \d\.\d{4} test_acc: \d\.\d{4}", notebook)


def test_readme_links_every_page_of_the_site_each_to_a_page_and_anchor_it_has(site):
    readme = (ROOT / "README.md").read_text()
    docs = {(ROOT / "docs" / page).resolve(): page for page in nav_pages()}  # the notebook's page is a link to it
    linked = set()
    for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]*))?\)", readme):
        if re.match(r"[a-z]+://", target):
            continue
        path = (ROOT / target).resolve()
        assert path.exists(), f"README.md links {target}, which does not exist"
        if path not in docs:
            assert not anchor, f"README.md links {target}#{anchor}, outside the site"  # findall gives "" for no anchor
            continue
        linked.add(docs[path])
        if anchor:
            assert f'id="{anchor}"' in built_page(site, docs[path]).read_text(), f"{target} has no anchor #{anchor}"
    assert sorted(set(docs.values()) - linked) == [], "pages of the site that README.md does not link"
