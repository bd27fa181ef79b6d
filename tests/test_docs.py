"""The docs site and the code cannot drift apart.

* The site builds with ``-W`` (any warning is an error): pages include code by ``literalinclude`` with
  ``:pyobject:``, so a renamed function, a broken link or a duplicate equation label fails here.
* Every ``mechanisms/<stem>.py`` has its page ``docs/mechanisms/<stem>.md`` with display math and a
  ``literalinclude`` of the file, and a row in the catalogue ``docs/mechanisms/index.md``.
* Every ``eq. (N)`` a file cites is the equation labelled ``<stem>-N`` on its page (``transformer-N`` for
  ``transformer_implementation.py``), and the labels of a page run 1..K in page order, so the number
  Sphinx displays, which restarts at (1) on every page, is the number the code cites.

The mechanism tests are parametrised over the files that exist when the tests are collected.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CORE = ROOT / "transformer_implementation.py"
MECHANISMS = sorted(p for p in (ROOT / "mechanisms").glob("*.py") if p.name != "__init__.py")

CITATION = re.compile(r"eq\. \((\d+)\)")  # `# eq. (3)` in a comment or docstring
# `$$ (label)` at the end of a line closes a numbered equation (MyST dollarmath syntax).
ANY_LABEL = re.compile(r"\$\$[ \t]*\(([^()\s$]+)\)[ \t]*$", re.MULTILINE)
# Other ways to number an equation in MyST; each would shift the displayed numbers past the labels.
OTHER_NUMBERING = re.compile(
    r"^\\begin\{(equation|multline|gather|align|alignat|flalign)\}"  # top-level amsmath, unstarred
    r"|^:label:",  # a {math} directive with a label
    re.MULTILINE,
)


def cited_equations(path):
    """The equation numbers a source file cites, in order of first appearance."""
    numbers = []
    for match in CITATION.finditer(path.read_text(encoding="utf-8")):
        if int(match.group(1)) not in numbers:
            numbers.append(int(match.group(1)))
    return numbers


def check_equations(source, page, stem):
    """Every equation `source` cites is labelled `<stem>-N` on `page`, and the labels run 1..K."""
    assert page.exists(), f"{source.name} cites equations but its page {page.relative_to(ROOT)} is missing"
    text = page.read_text(encoding="utf-8")
    labels = ANY_LABEL.findall(text)
    rel = page.relative_to(ROOT)

    foreign = [label for label in labels if not re.fullmatch(rf"{re.escape(stem)}-\d+", label)]
    assert not foreign, (
        f"{rel}: equation labels {foreign} do not have the form '{stem}-N' "
        f"(labels are global across the site; each page uses its own stem)"
    )
    numbers = [int(label.rsplit("-", 1)[1]) for label in labels]
    assert numbers == list(range(1, len(numbers) + 1)), (
        f"{rel}: equation labels must run {stem}-1, {stem}-2, ... in page order without gaps, "
        f"so the displayed number equals the cited one; found {[f'{stem}-{n}' for n in numbers]}"
    )
    other = OTHER_NUMBERING.findall(text)
    assert not other, (
        f"{rel}: numbers equations another way too ({other}), which shifts the displayed numbers; "
        f"use `$$ ... $$ ({stem}-N)` (with \\begin{{aligned}} inside for several lines)"
    )
    missing = [n for n in cited_equations(source) if n not in numbers]
    assert not missing, (
        f"{source.relative_to(ROOT)} cites " + ", ".join(f"eq. ({n})" for n in missing)
        + f" but {rel} has no equation labelled " + ", ".join(f"'{stem}-{n}'" for n in missing)
        + f" (it has {len(numbers)} labelled equations)"
    )


# ---------------------------------------------------------------------------------------------
# The core and its walk-through.


@pytest.mark.skipif(not CORE.exists(), reason="transformer_implementation.py not written yet")
def test_core_equations_are_on_the_transformer_page():
    check_equations(CORE, DOCS / "transformer.md", "transformer")


@pytest.mark.skipif(not CORE.exists(), reason="transformer_implementation.py not written yet")
def test_transformer_page_includes_the_core_by_pyobject():
    text = (DOCS / "transformer.md").read_text(encoding="utf-8")
    assert "../transformer_implementation.py" in text and ":pyobject:" in text, (
        "docs/transformer.md must show the code with "
        "```{literalinclude} ../transformer_implementation.py``` and :pyobject:, never pasted"
    )


# ---------------------------------------------------------------------------------------------
# One page per mechanism file.


@pytest.mark.parametrize("source", MECHANISMS, ids=lambda p: p.stem)
def test_mechanism_has_page_with_math_and_code(source):
    page = DOCS / "mechanisms" / f"{source.stem}.md"
    assert page.exists(), f"{source.relative_to(ROOT)} has no page {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    assert re.search(r"^\$\$|```\{math\}", text, re.MULTILINE), f"{page.relative_to(ROOT)} shows no display math"
    include = re.search(rf"```\{{literalinclude\}}\s+\.\./\.\./mechanisms/{re.escape(source.name)}\s", text)
    assert include, (
        f"{page.relative_to(ROOT)} does not include its code with "
        f"```{{literalinclude}} ../../mechanisms/{source.name}"
    )


@pytest.mark.parametrize("source", MECHANISMS, ids=lambda p: p.stem)
def test_mechanism_equations_are_on_its_page(source):
    check_equations(source, DOCS / "mechanisms" / f"{source.stem}.md", source.stem)


@pytest.mark.parametrize("source", MECHANISMS, ids=lambda p: p.stem)
def test_mechanism_is_in_the_catalogue(source):
    catalogue = (DOCS / "mechanisms" / "index.md").read_text(encoding="utf-8")
    row = re.search(rf"^\|.*\]\({re.escape(source.stem)}\.md\)", catalogue, re.MULTILINE)
    assert row, (
        f"docs/mechanisms/index.md has no catalogue row linking [<name>]({source.stem}.md) "
        f"for {source.relative_to(ROOT)}"
    )


# ---------------------------------------------------------------------------------------------
# The whole site, as a user builds it, but into a fresh temporary folder.


@pytest.mark.slow
def test_docs_build_without_warnings(built_docs):
    result, html = built_docs
    assert result.returncode == 0, (
        f"the docs build failed (exit {result.returncode}); warnings and errors:\n"
        f"{result.stderr.strip()}\n{result.stdout.strip()[-3000:]}"
    )
    assert (html / "index.html").exists()
    for stem in [p.stem for p in MECHANISMS]:
        assert (html / "mechanisms" / f"{stem}.html").exists(), f"no page built for {stem}"
