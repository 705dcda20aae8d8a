"""The distribution (pyproject.toml): its name, densenet-paper, is the one every install hint names."""
from __future__ import annotations

from pathlib import Path


def test_distribution_name_is_ours_everywhere():
    """`densenet` (and `densenet-pytorch`) on PyPI are other projects: every install hint names this
    package's distribution, densenet-paper; the import name and the command stay `densenet`."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "densenet-paper" and project["scripts"] == {"densenet": "densenet.cli:main"}
    texts = {p: p.read_text() for p in [root / "README.md", *sorted((root / "src").rglob("*.py"))]}
    hints = [(p.name, m) for p, t in texts.items() for m in re.findall(r"pip install[^\n`]*", t)]
    assert hints
    for where, hint in hints:  # a package-name install hint: `pip install NAME[extra]`, never `densenet[...]`
        assert not re.search(r"(?<![\w-])densenet(?!-paper)[\[\s'\"]|(?<![\w-])densenet$", hint), (where, hint)
