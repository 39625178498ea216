"""docs/losses.md, the formula sheet: one section per registry entry, read from the registries.

A section is `### <kind>: <name>` followed by a `Formula:` line (the formula in backticks) and
either a `Paper:` paragraph with at least one `arXiv:NNNN.NNNNN` or, only where there is no
arXiv paper, a `Source:` paragraph carrying an explicit marker, `(no paper)` or `(no arXiv id)`.
Every registered class's docstring points to its section (`docs/losses.md#<kind>-<name>`).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from raypo.losses import DIVERGENCES, KERNELS, LOSSES, PRIORS, SCHEDULES, Registry

ROOT = Path(__file__).resolve().parents[2]
SHEET = ROOT / "docs" / "losses.md"

# heading kind -> registry; "option" (the modifiers a loss declares) is read from LOSSES below
REGISTRIES: dict[str, Registry] = {
    "loss": LOSSES, "divergence": DIVERGENCES, "kernel": KERNELS, "prior": PRIORS,
    "schedule": SCHEDULES,
}
KINDS = (*REGISTRIES, "option")

HEADING = re.compile(r"^### (\w+): (\S+)\s*$")
FORMULA = re.compile(r"^Formula: .*`[^`]+`")
ARXIV = re.compile(r"\barXiv:\d{4}\.\d{4,5}\b")
NO_PAPER_MARKERS = ("(no paper)", "(no arXiv id)")
POINTER = re.compile(r"docs/losses\.md#([\w-]+)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchor(kind: str, name: str) -> str:
    return slug(f"{kind}: {name}")


def parse(text: str) -> tuple[dict[tuple[str, str], list[str]], list[tuple[str, str]]]:
    """({(kind, name): the section's lines}, duplicated headings). A section runs to the next
    heading of any level; headings inside fenced blocks are not headings."""
    sections: dict[tuple[str, str], list[str]] = {}
    duplicates = []
    current = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            match = HEADING.match(line)
            current = (match.group(1), match.group(2)) if match else None
            if current is not None:
                if current in sections:
                    duplicates.append(current)
                sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
    return sections, duplicates


def paragraphs(lines: list[str]) -> list[str]:
    """The section's paragraphs, each joined onto one line (a `Paper:` line may wrap)."""
    out, block = [], []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.strip())
        elif block:
            out.append(" ".join(block))
            block = []
    return out


def section_problems(lines: list[str]) -> list[str]:
    """What a section lacks: its formula, its paper's arXiv id or the explicit no-paper marker."""
    problems = []
    if not any(FORMULA.match(line) for line in lines):
        problems.append("no `Formula:` line with the formula in backticks")
    paras = paragraphs(lines)
    papers = [p for p in paras if p.startswith("Paper:")]
    sources = [p for p in paras if p.startswith("Source:")]
    if papers and sources:
        problems.append("both `Paper:` and `Source:` (one or the other)")
    elif papers:
        if not any(ARXIV.search(p) for p in papers):
            problems.append("a `Paper:` paragraph without an arXiv id (arXiv:NNNN.NNNNN)")
    elif sources:
        if not any(p.endswith(NO_PAPER_MARKERS) for p in sources):
            problems.append(f"a `Source:` paragraph not ending in one of {NO_PAPER_MARKERS}")
    else:
        problems.append("neither `Paper:` (with an arXiv id) nor `Source:` with a no-paper marker")
    return problems


def options_of(losses: Registry) -> set[str]:
    """Every option (modifier) some registered loss declares."""
    return {option for name in losses for option in losses.options(name)}


def expected_entries(registries: dict[str, Registry]) -> dict[str, list[str]]:
    """kind -> the names that need a section, read from the registries."""
    entries = {kind: list(registry) for kind, registry in registries.items()}
    entries["option"] = sorted(options_of(registries["loss"]))
    return entries


def missing_sections(text: str, registries: dict[str, Registry]) -> list[str]:
    sections, _ = parse(text)
    return [f"### {kind}: {name}"
            for kind, names in expected_entries(registries).items()
            for name in names if (kind, name) not in sections]


@pytest.fixture(scope="module")
def sheet() -> str:
    assert SHEET.is_file(), f"{SHEET} is missing"
    return SHEET.read_text(encoding="utf-8")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_every_registry_entry_has_a_section_with_formula_and_paper(sheet, kind):
    names = expected_entries(REGISTRIES)[kind]
    assert names, f"registry of {kind} is empty"
    sections, _ = parse(sheet)
    missing = [name for name in names if (kind, name) not in sections]
    assert not missing, (
        f"docs/losses.md has no section for {kind} {missing}: add `### {kind}: <name>`")
    problems = {name: section_problems(sections[(kind, name)]) for name in names}
    problems = {name: p for name, p in problems.items() if p}
    assert not problems, f"docs/losses.md, {kind} sections: {problems}"


@pytest.mark.timeout(60)
def test_every_section_names_a_registered_entry_once(sheet):
    sections, duplicates = parse(sheet)
    assert not duplicates, f"headings repeated in docs/losses.md: {duplicates}"
    expected = {(kind, name) for kind, names in expected_entries(REGISTRIES).items()
                for name in names}
    stray = sorted(key for key in sections if key not in expected)
    assert not stray, (f"docs/losses.md has sections for unknown kinds or unregistered names: "
                       f"{stray} (kinds: {', '.join(KINDS)})")


@pytest.mark.timeout(60)
def test_a_new_registry_entry_without_a_section_fails(sheet):
    assert missing_sections(sheet, REGISTRIES) == []
    for kind in REGISTRIES:
        grown = dict(REGISTRIES)
        grown[kind] = Registry(kind)
        grown[kind].update(REGISTRIES[kind])
        grown[kind]["not_documented"] = object
        assert missing_sections(sheet, grown) == [f"### {kind}: not_documented"]
    # a renamed heading is a missing section
    renamed = sheet.replace("### loss: dpo\n", "### loss: dpo_renamed\n")
    assert missing_sections(renamed, REGISTRIES) == ["### loss: dpo"]
    # a section that loses its paper, or its formula, is reported
    lines = ["Formula: `L = x`", "", "Paper: a paper without an id"]
    assert section_problems(lines) != []
    assert section_problems(["Formula: `L = x`", "", "Source: raypo"]) != []
    assert section_problems(["Paper: arXiv:2305.18290"]) != []
    assert section_problems(["Formula: `L = x`", "", "Paper: Someone,", "arXiv:2305.18290."]) == []
    assert section_problems(["Formula: `L = x`", "", "Source: raypo (no paper)"]) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registered_class_docstring_points_to_its_section(sheet, kind):
    sections, _ = parse(sheet)
    anchors = {anchor(k, n) for k, n in sections}
    wrong = {}
    for name, cls in REGISTRIES[kind].items():
        # its own docstring, not one inherited from a parent class
        own = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
        pointers = POINTER.findall(own)
        want = anchor(kind, name)
        if want not in pointers:
            wrong[name] = f"docstring lacks `docs/losses.md#{want}`"
        elif any(p not in anchors for p in pointers):
            wrong[name] = f"docstring points to missing anchors {pointers}"
    assert not wrong, f"{kind} classes: {wrong}"


@pytest.mark.timeout(60)
def test_nothing_cites_the_sheet_outside_the_repository():
    outside = "shared/" + "LOSSES.md"
    files = [*sorted((ROOT / "raypo").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
             *sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
    citing = [str(path.relative_to(ROOT)) for path in files
              if outside in path.read_text(encoding="utf-8")]
    assert not citing, f"cite docs/losses.md (and the papers) instead of {outside}: {citing}"
