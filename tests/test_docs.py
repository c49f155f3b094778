"""The repository stands on its own: nothing points outside it, and every relative link in README.md
and docs/*.md reaches a file (and heading) that is in the repository, so the docs cannot rot."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Names of documents that live outside the repository; spelt in pieces so this file does not name them.
OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "REFERENCES" + ".md")

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEF = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def repo_files(root: Path = ROOT) -> set[str]:
    """Files in the repository (tracked, or new and not ignored), as paths relative to `root`."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout")
    return {p for p in res.stdout.split("\0") if p and not p.startswith(".venv/") and (root / p).is_file()}


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_mentions(files: set[str], root: Path = ROOT) -> list[str]:
    """`path:line: text` for every line that names a document outside the repository."""
    hits = []
    for rel in sorted(files):
        text = text_of(root / rel)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                hits.append(f"{rel}:{n}: {line.strip()}")
    return hits


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code removed."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings (repeated headings get -1, -2, … as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and link definition outside code."""
    out = []
    for n, line in prose_lines(text):
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
        m = LINK_DEF.match(line)
        if m:
            out.append((n, m.group(1)))
    return out


def broken_links(doc: Path, files: set[str], root: Path = ROOT) -> list[str]:
    """`doc:line: target (why)` for every relative link of `doc` that does not reach the repository."""
    root, doc = root.resolve(), doc.resolve()
    text = doc.read_text(encoding="utf-8")
    rel_doc = doc.relative_to(root).as_posix()
    problems = []
    for n, target in links(text):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        where = f"{rel_doc}:{n}: {target}"
        try:
            rel = dest.relative_to(root).as_posix()
        except ValueError:
            problems.append(f"{where} (outside the repository)")
            continue
        if dest.is_dir():
            if not any(f.startswith(rel.rstrip("/") + "/") for f in files):
                problems.append(f"{where} (no files of the repository in that folder)")
            continue
        if rel not in files:
            problems.append(f"{where} (no such file in the repository)")
            continue
        if anchor and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where} (no heading '#{anchor}' in {rel})")
    return problems


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# --- the repository ------------------------------------------------------------------------------


def test_nothing_points_outside_the_repository():
    files = repo_files()
    assert "README.md" in files and "tests/test_docs.py" in files
    hits = outside_mentions(files)
    assert not hits, "files name documents outside the repository:\n" + "\n".join(hits)


def test_every_relative_link_reaches_the_repository():
    files = repo_files()
    docs = documents()
    assert len(docs) >= 3
    problems = [p for d in docs for p in broken_links(d, files)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_architecture_and_reference_pages_are_linked_from_the_readme():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = {t.partition("#")[0] for _, t in links(text)}
    assert {"docs/architecture.md", "docs/references.md"} <= targets


# --- the checker itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("heading, anchor", [
    ("Recipe: Hugging Face → ONNX", "recipe-hugging-face--onnx"),
    ("FLOPs (`mptc summary`)", "flops-mptc-summary"),
    ("`report.json`", "reportjson"),
    ("MatFormer: nested sub-networks and Mix'n'Match", "matformer-nested-sub-networks-and-mixnmatch"),
    ("See [the map](docs/architecture.md)", "see-the-map"),
    ("dimension_symbols", "dimension_symbols"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_are_numbered_and_code_is_not_a_heading():
    text = "# Notes\n## Notes\n```\n# not a heading\n```\n## Notes\n"
    assert anchors(text) == {"notes", "notes-1", "notes-2"}


def _tree(tmp_path: Path, doc: str) -> tuple[Path, set[str]]:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Second part\n")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "x.mpt").write_text("model x { }\n")
    (tmp_path / "README.md").write_text(doc)
    return tmp_path / "README.md", {"docs/a.md", "examples/x.mpt", "README.md"}


def test_good_links_pass(tmp_path):
    doc, files = _tree(tmp_path, "# Top\n[a](docs/a.md) [b](docs/a.md#second-part) [c](#top) [d](examples/)\n"
                                 "[web](https://example.com/x.md) ![img](examples/x.mpt)\n"
                                 "`[not a link](nowhere.md)`\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(doc, files, tmp_path) == []


def test_broken_links_are_reported_with_their_line_and_reason(tmp_path):
    doc, files = _tree(tmp_path, "# Top\n[a](docs/missing.md)\n[b](docs/a.md#third-part)\n[c](#bottom)\n"
                                 "[d](../elsewhere.md)\n[e]: docs/gone.md\n")
    (tmp_path / "docs" / "untracked.md").write_text("# U\n")
    with doc.open("a") as f:
        f.write("[f](docs/untracked.md)\n")
    assert broken_links(doc, files, tmp_path) == [
        "README.md:2: docs/missing.md (no such file in the repository)",
        "README.md:3: docs/a.md#third-part (no heading '#third-part' in docs/a.md)",
        "README.md:4: #bottom (no heading '#bottom' in README.md)",
        "README.md:5: ../elsewhere.md (outside the repository)",
        "README.md:6: docs/gone.md (no such file in the repository)",
        "README.md:7: docs/untracked.md (no such file in the repository)",
    ]


def test_outside_mentions_are_found_in_text_files_only(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n# see " + OUTSIDE[1] + "\n")
    (tmp_path / "b.bin").write_bytes(b"\0\1" + OUTSIDE[0].encode())
    (tmp_path / "c.md").write_text("the map is in docs/architecture.md\n")
    assert outside_mentions({"a.py", "b.bin", "c.md"}, tmp_path) == [f"a.py:2: # see {OUTSIDE[1]}"]
