"""The repository stands on its own: no reference to files outside it, every citation of the design notes
names a section docs/design.md has, and the design notes' layout names every module."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".cpp", ".cu", ".h", ".txt", ".cfg", ".ini", ".yml", ".yaml", ""}
OUTSIDE = re.compile(r"\.\./shared|/work/|DESIGN\.md")
CITATION = re.compile(r"docs/design\.md,? section (\d+)")


def _repo_files():
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if path.is_file() and path.name != ".git" and not any(
                p.startswith(".") and p != ".ci" or p.endswith(".egg-info") or p in ("build", "dist", "out", "__pycache__")
                for p in parts[:-1]) and path.suffix in TEXT_SUFFIXES:
            yield path


def test_nothing_refers_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in _repo_files() if path != pathlib.Path(__file__)
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)


def test_design_citations_resolve():
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M))
    assert sections == {str(n) for n in range(1, 10)}, sorted(sections)
    cited = {(str(path.relative_to(ROOT)), n) for path in _repo_files()
             for n in CITATION.findall(path.read_text(errors="replace"))}
    assert cited, "nothing cites docs/design.md: the citation pattern is out of date"
    assert not [c for c in cited if c[1] not in sections], sorted(cited)


def test_design_layout_names_every_module():
    design = DESIGN.read_text()
    layout = design[design.index("## 2. Layout"):design.index("\n## 3. ")]
    modules = [p for layer in ("ops", "nn", "perf", "cli") for p in (ROOT / "fastgan" / layer).glob("*.py")
               if p.name != "__init__.py"] + [*(ROOT / "kernels").glob("*.py"), *(ROOT / "csrc").glob("*.c*")]
    missing = [f"{p.parent.name}/{p.name}" for p in modules if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"docs/design.md section 2 does not mention {missing}"
