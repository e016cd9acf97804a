"""The documentation site: it builds with --strict (a broken link fails the build), its navigation holds
the pages a researcher looks for, the configuration reference lists every config key, and the README is
a landing page that links only to pages that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"index.md", "quickstart.md", "your-world.md", "methods.md", "lab.md", "results.md", "scale.md",
         "reference/config.md", "reproducibility.md", "benchmarks.md", "architecture.md"}
zensical = pytest.mark.skipif(shutil.which("zensical") is None, reason="zensical is not installed (the dev extra)")


def _nav_files(nav) -> list[str]:
    """Every page file the nav names, however deeply nested."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    return [f for item in nav for f in _nav_files(item)]


def _build(config: dict, where: Path) -> subprocess.CompletedProcess:
    """`zensical build --strict` of `config` written into `where` (the site goes there too)."""
    path = where / "mkdocs.yml"
    path.write_text(yaml.safe_dump({**config, "site_dir": str(where / "site")}, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "zensical", "build", "--strict", "-f", str(path)],
                          check=False, cwd=where, capture_output=True, text=True, timeout=300)


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


@zensical
def test_the_site_builds_strict(tmp_path):
    config = _config()
    shutil.copytree(ROOT / "docs", tmp_path / "docs")  # zensical wants docs_dir inside its config's folder
    config["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    done = _build(config, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in PAGES | {"reference/api/ops.md"}:
        out = tmp_path / "site" / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert out.exists(), out
    api = (tmp_path / "site" / "reference/api/ops/index.html").read_text(encoding="utf-8")
    assert "rlhf_overopt.ops.aggregate.uncertainty_weighted" in api  # mkdocstrings rendered the docstrings
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis" not in html and "fonts.gstatic" not in html  # nothing fetched to show a page


@zensical
def test_a_broken_link_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("api", "*.png"))
    page = docs / "methods.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [a page that is not there](no-such-page.md).\n")
    config = {k: v for k, v in _config().items() if k not in ("nav", "plugins")}  # no API pages: fast
    done = _build({**config, "docs_dir": "docs"}, tmp_path)
    assert done.returncode != 0
    assert "page does not exist" in done.stdout + done.stderr  # the planted link, in colour char by char


def test_the_navigation_holds_the_pages():
    nav = _nav_files(_config()["nav"])
    assert PAGES <= set(nav), PAGES - set(nav)
    assert any(f.startswith("reference/api/") for f in nav)
    for f in nav:
        assert (ROOT / "docs" / f).exists(), f
    api = "".join((ROOT / "docs" / f).read_text(encoding="utf-8") for f in nav if f.startswith("reference/api/"))
    for module in ("ops.losses", "ops.aggregate", "rewards.ensemble", "rollout", "evaluate", "update", "pool"):
        assert f"::: rlhf_overopt.{module}\n" in api, module


def test_the_configuration_reference_lists_every_key():
    from rlhf_overopt.config.experiment import field_docs

    page = (ROOT / "docs/reference/config.md").read_text(encoding="utf-8")
    on_page = re.findall(r"^\| `([\w.]+)` \|", page, flags=re.MULTILINE)
    keys = [key for key, *_ in field_docs()]
    assert sorted(set(keys) - set(on_page)) == [], "missing: run python -m analysis.results --write"
    assert sorted(set(on_page) - set(keys)) == [], "stale: run python -m analysis.results --write"
    assert len(on_page) == len(keys)


def test_the_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    # .ci/run runs this line verbatim
    assert ('pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e ".[dev]" && '
            "python -m pytest -q\n") in text
    assert "<!-- results:" not in text  # generated tables live in docs/
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    nav = set(_nav_files(_config()["nav"]))
    for link in links:
        assert "://" not in link, link
        assert (ROOT / link).exists(), link
        if link.startswith("docs/") and link.endswith(".md"):
            assert link.removeprefix("docs/") in nav, link
