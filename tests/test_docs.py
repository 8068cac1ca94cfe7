"""The docs stand alone: every citation of a docs page resolves, nothing cites the private math notes, every page is
in the index, and every module path a page names exists.

A citation is ``docs/NAME.md §N`` or ``docs/NAME.md section N`` (N may be dotted: 2.7, 3.4); it resolves when
docs/NAME.md exists and has a Markdown heading whose leading number is N (``## 2. Forward pass`` is 2,
``### 2.7 Loss and L2Wrap`` is 2.7). The files scanned are the tracked ones (``git ls-files`` in the repository
root found from this file), or every file under the root when git is not available.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Built, not written out, so this file does not match what it looks for.
PRIVATE_NOTES = tuple(f"rwkv{n}-math" for n in (4, 5, 6, 7)) + ("../" + "shared",)
CITATION = re.compile(r"docs/([\w.-]+?)\.md\s*(?:§\s*|section\s+)(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?:\s|$)")
MODULE_PATH = re.compile(r"minirwkv/[\w/]*?\w+\.py\b")
TEMPLATE = re.compile(r"(?:rwkv|wkv|infer)N\b")  # rwkvN/, wkvN.py: the pattern of a future generation, not a file
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", "build", "dist", ".pytest_cache", ".ci"}


def tracked_files(root: Path = ROOT) -> list[str]:
    """Paths relative to ``root``, with "/" separators: git's tracked files, else a walk of the tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
        files = [f for f in out.stdout.decode("utf-8", "replace").split("\0") if f]
        if files:
            return [f for f in files if (root / f).is_file()]  # a file deleted in the working tree is not read
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            files.append((Path(dirpath) / name).relative_to(root).as_posix())
    return files


def read_text(root: Path, rel: str) -> str:
    return (root / rel).read_text(encoding="utf-8", errors="replace")


def heading_numbers(text: str) -> set[str]:
    """The leading numbers of a page's headings: {"2", "2.7", ...}."""
    return {m.group(1) for line in text.splitlines() if (m := HEADING.match(line))}


def citations(text: str) -> list[tuple[int, str, str]]:
    """(line number, page name, section number) of every docs citation in ``text``."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in CITATION.finditer(line):
            found.append((lineno, m.group(1), m.group(2)))
    return found


def unresolved_citations(root: Path, files: list[str]) -> list[str]:
    pages: dict[str, set[str] | None] = {}
    bad = []
    for rel in files:
        if not rel.endswith((".py", ".md")):
            continue
        for lineno, page, number in citations(read_text(root, rel)):
            if page not in pages:
                path = root / "docs" / f"{page}.md"
                pages[page] = heading_numbers(path.read_text(encoding="utf-8")) if path.is_file() else None
            if pages[page] is None:
                bad.append(f"{rel}:{lineno}: docs/{page}.md does not exist (cited as §{number})")
            elif number not in pages[page]:
                bad.append(f"{rel}:{lineno}: docs/{page}.md has no heading numbered {number}")
    return bad


def private_mentions(root: Path, files: list[str]) -> list[str]:
    bad = []
    for rel in files:
        if rel.startswith(".ci/"):
            continue
        try:
            data = (root / rel).read_bytes()
        except OSError:
            continue
        for note in PRIVATE_NOTES:
            if note.encode() in data:
                lines = data.decode("utf-8", "replace").splitlines()
                where = [i for i, line in enumerate(lines, 1) if note in line]
                bad.append(f"{rel}:{','.join(map(str, where)) or '?'}: mentions {note!r}")
    return bad


def doc_pages(files: list[str]) -> list[str]:
    return sorted(rel for rel in files if re.fullmatch(r"docs/[^/]+\.md", rel))


def unindexed_pages(root: Path, files: list[str]) -> list[str]:
    index = read_text(root, "docs/README.md") if (root / "docs/README.md").is_file() else ""
    return [rel for rel in doc_pages(files) if rel != "docs/README.md"
            and not re.search(r"(?<![\w.-])" + re.escape(rel.split("/", 1)[1]) + r"\b", index)]


def missing_module_paths(root: Path, files: list[str]) -> list[str]:
    bad = []
    for rel in doc_pages(files):
        for lineno, line in enumerate(read_text(root, rel).splitlines(), 1):
            for path in MODULE_PATH.findall(line):
                if not TEMPLATE.search(path) and not (root / path).is_file():
                    bad.append(f"{rel}:{lineno}: {path} does not exist")
    return bad


@pytest.fixture(scope="module")
def files() -> list[str]:
    return tracked_files()


def test_every_docs_citation_resolves(files):
    assert unresolved_citations(ROOT, files) == []


def test_nothing_cites_the_private_math_notes(files):
    assert private_mentions(ROOT, files) == []


def test_every_docs_page_is_in_the_index(files):
    assert (DOCS / "README.md").is_file(), "docs/README.md, the index of the docs, is missing"
    assert unindexed_pages(ROOT, files) == []


def test_every_module_path_in_the_docs_exists(files):
    assert missing_module_paths(ROOT, files) == []


def test_the_checks_can_fail(tmp_path):
    """Each checker finds a planted mistake (so an empty result above means something)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/README.md").write_text("# Index\n[a.md](a.md)\n")
    (tmp_path / "docs/a.md").write_text("# A\n## 2. Forward\n### 2.7 Loss\nsee minirwkv/nothing_here.py\n")
    (tmp_path / "docs/b.md").write_text("# B, not in the index\n")
    a, missing = "docs/a" + ".md", "docs/missing" + ".md"  # split, so this file cites nothing itself
    (tmp_path / "x.py").write_text(f"# {a} §2.7 and {a} section 2 resolve; {a} §2.8 does not,\n"
                                   f"# nor {missing} §1\n# " + PRIVATE_NOTES[0] + " section 2\n")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci/notes.md").write_text(PRIVATE_NOTES[0] + "\n")
    files = ["docs/README.md", "docs/a.md", "docs/b.md", "x.py", ".ci/notes.md"]
    bad = unresolved_citations(tmp_path, files)
    assert len(bad) == 2 and "no heading numbered 2.8" in bad[0] and "missing.md does not exist" in bad[1]
    assert private_mentions(tmp_path, files) == [f"x.py:3: mentions {PRIVATE_NOTES[0]!r}"]
    assert unindexed_pages(tmp_path, files) == ["docs/b.md"]
    assert missing_module_paths(tmp_path, files) == ["docs/a.md:4: minirwkv/nothing_here.py does not exist"]
    assert heading_numbers("## 2. Forward pass\n### 2.7 Loss and L2Wrap\n## Notes\n#### 10\n") == {"2", "2.7", "10"}
