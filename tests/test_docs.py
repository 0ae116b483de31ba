"""The README and docs/: nothing of the README before the split lost (tools/docs_moved.py),
every relative link and anchor leading somewhere, and a module map that names every module
of the tree. No servers: these run in a second."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tools import docs_moved

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAP_LINE = re.compile(r"^- `([^`]+)` — ", re.MULTILINE)


def has_old_revision() -> bool:
    probe = ["git", "cat-file", "-e", f"{docs_moved.OLD_REVISION}^{{commit}}"]
    return subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not has_old_revision(), reason="the pre-split commit is not in this clone")
def test_nothing_of_the_old_readme_is_lost() -> None:
    assert docs_moved.problems(docs_moved.old_readme(ROOT), ROOT) == []


@pytest.mark.fast
def test_the_check_names_what_was_not_moved(tmp_path: Path) -> None:
    old = (
        "# Title\n\n- **Lead** (`a.py`): the first fact. The second fact.\n\n"
        "| a | b |\n| --- | --- |\n| 1 | 2 |\n\n```sh\nmake run\n```\n"
    )
    (tmp_path / "docs" / "design").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# Title\n\n```sh\nmake run\n```\n")
    (tmp_path / "docs" / "design" / "a.md").write_text(
        "## Lead\n\nIn `a.py`,\nthe *first* fact.\n\n| a | b |\n|---|---|\n"
    )
    missing = docs_moved.problems(old, tmp_path, rewordings={}, drops={})
    assert missing == ["line 3: the second fact", "line 7: 1 | 2"]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = docs_moved.plain(heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a `#` line inside a code block is none)."""
    out, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        in_code ^= line.startswith("```")
        if line.startswith("#") and not in_code:
            out.add(slug(line.lstrip("#")))
    return out


@pytest.mark.fast
def test_relative_links_and_their_anchors_lead_somewhere() -> None:
    broken = []
    for path in docs_moved.new_files(ROOT):
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists() or (anchor and anchor not in anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert broken == []


@pytest.mark.fast
def test_the_module_map_names_every_module_once() -> None:
    modules = {
        str(p.relative_to(ROOT))
        for pattern in ("issuer/*.py", "loadtest/*.py", "bench/*.py", "lua/*.lua")
        for p in ROOT.glob(pattern)
        if p.name != "__init__.py"
    } | {"issuer/data/"}
    mapped = MAP_LINE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(mapped) == sorted(modules)
