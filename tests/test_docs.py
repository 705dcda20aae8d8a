"""The documentation: a short README with a table of contents, a MkDocs site whose navigation holds every
page, links that resolve, and a strict build (skipped where mkdocs is not installed; CI installs it:
`.ci/run`). The commands on the pages are checked by tests/test_readme.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import nav_pages

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
ROOT_PAGES = [README, ROOT / "BENCHMARKS.md", ROOT / "BENCHMARKS_HISTORY.md", ROOT / "DESIGN.md"]
SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)  # docs/BENCHMARKS*.md include the root files
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def without_code(text: str) -> str:
    """Markdown outside fenced blocks and inline code spans (links and headings live there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def headings(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6})\s+(.+?)\s*#*$", without_code_blocks(text), re.M)]


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    text = re.sub(r"[`*]", "", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """Python-Markdown's (the toc extension's default, as MkDocs builds the site)."""
    text = re.sub(r"[`*]", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def page_text(path: Path) -> str:
    """A page's Markdown, a snippet page's being the file it includes."""
    text = path.read_text()
    m = SNIPPET.fullmatch(text.strip())
    return (ROOT / m.group(1)).read_text() if m else text


def anchors(path: Path, slug) -> set[str]:
    return {slug(h) for h in headings(page_text(path))}



def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_readme_table_of_contents_links_to_its_sections():
    text = README.read_text()
    toc = text.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", toc)
    assert len(entries) >= 8
    have = anchors(README, github_slug)
    missing = [(label, a) for label, a in entries if a not in have]
    assert not missing, f"table-of-contents entries without a section: {missing}"
    sections = {github_slug(h) for h in re.findall(r"^## (.+)$", without_code_blocks(text), re.M)} - {"contents"}
    assert sections <= {a for _, a in entries}, f"sections missing from the contents: {sections - {a for _, a in entries}}"
    labels = " ".join(label for label, _ in entries)
    for what in ("create_model", "densenet.load", "Train from Python", "Export"):  # what a reader looks for first
        assert what in labels, what


def test_readme_gives_a_user_install_a_cpu_install_and_the_ci_commands():
    text = README.read_text()
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    assert "pip install -e .\n" in bash  # the user's install, without the test extras
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in bash
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in bash and 'pip install -e ".[test]"' in ci  # CI installs as README says
    test_command = "python -m pytest -q -n auto --dist worksteal"
    assert test_command + "  " in bash and test_command + " ||" in ci  # ... and runs README's test command
    assert "mkdocs build --strict" in ci


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    nav = nav_pages()
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages()}
    assert not on_disk - set(nav), f"pages missing from mkdocs.yml's nav: {sorted(on_disk - set(nav))}"
    assert not set(nav) - on_disk, f"nav entries without a page: {sorted(set(nav) - on_disk)}"
    assert len(nav) == len(set(nav))


def test_snippet_pages_include_files_that_exist():
    for page in pages():
        for target in SNIPPET.findall(page.read_text()):
            assert (ROOT / target).is_file(), (page, target)


def test_every_relative_link_resolves():
    """README, BENCHMARKS*.md, DESIGN.md and every docs page: each relative link names a file that
    exists, and an anchor into a Markdown file names one of its headings (GitHub's anchors for the
    repository's files, MkDocs' for the site's pages)."""
    broken = []
    for source in ROOT_PAGES + pages():
        for target in LINK.findall(without_code(source.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # http(s), mailto: not checked here
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            if not file.exists():
                broken.append(f"{source.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and file.suffix == ".md":
                slug = mkdocs_slug if DOCS in file.parents else github_slug
                if anchor not in anchors(file, slug):
                    broken.append(f"{source.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_included_root_files_link_only_to_what_the_site_has_too():
    """BENCHMARKS*.md appear in the site through snippets: a relative link in them must resolve both
    beside them (the repository) and beside their docs/ page (the site)."""
    for page in pages():
        for target in SNIPPET.findall(page.read_text()):
            for link in LINK.findall(without_code((ROOT / target).read_text())):
                path = link.partition("#")[0]
                if re.match(r"^[a-z][a-z0-9+.-]*:", link) or not path:
                    continue
                assert (page.parent / path).exists(), f"{target}: {link} does not resolve in the site ({page})"


def test_install_hints_in_the_docs_name_the_distribution():
    """As tests/test_packaging.py for README and the source: `pip install NAME[extra]` names
    densenet-paper, never `densenet` (another project on PyPI)."""
    for page in pages():
        for hint in re.findall(r"pip install[^\n`]*", page.read_text()):
            assert not re.search(r"(?<![\w-])densenet(?!-paper)[\[\s'\"]|(?<![\w-])densenet$", hint), (page, hint)


def test_reference_pages_name_modules_that_exist():
    for page in (DOCS / "reference").glob("*.md"):
        for module in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M):
            parts = module.split(".")
            base = ROOT / "src" / Path(*parts)
            assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), (page.name, module)


def test_docs_extra_installs_what_mkdocs_yml_uses():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    names = {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0] for r in extra}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names
    assert "mkdocstrings[python]" in " ".join(extra)


def test_mkdocs_build_is_clean_in_strict_mode(tmp_path):
    """The site builds with no warning: a broken link, a page missing from the nav or a docstring
    mkdocstrings cannot read fails (a few seconds)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert (tmp_path / "site" / "reference" / "registry" / "index.html").is_file()
    assert "densenet.registry.create_model" in (tmp_path / "site" / "reference" / "registry" / "index.html").read_text()
