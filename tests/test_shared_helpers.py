"""Every mechanism file reads mechanism first, and its copies of the shared helpers are one text.

Each file in mechanisms/ ends with the shared input checks and mask helpers, after one banner comment
that says they are identical in every file. This test holds the files to that:

* the banner is present, once, and every top-level function after it is a shared helper (its name starts
  with an underscore); no class and no other code stands after it except the closing two-line
  ``if __name__ == "__main__":`` guard that calls the demo (the guard must come last, because the demo
  needs the helpers defined);
* a helper of a given name has the same source, letter for letter, in every file that has it, so a fix to
  one copy is made to all;
* no shared helper is defined before the banner as well (one copy per file).
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MECHANISMS = sorted(p for p in (ROOT / "mechanisms").glob("*.py") if p.name != "__init__.py")
BANNER = (
    "# =====================================================================================================\n"
    "# Input checks and mask helpers, identical letter for letter in every mechanism file that uses them\n"
    "# (tests/test_shared_helpers.py compares the copies). Fix one copy, fix them all.\n"
    "# =====================================================================================================\n"
)


def split_at_banner(path):
    """(text before the banner, top-level nodes after it, the source after it)."""
    text = path.read_text(encoding="utf-8")
    assert text.count(BANNER) == 1, f"{path.name}: the shared-helper banner must appear exactly once"
    head, tail = text.split(BANNER)
    return head, ast.parse(tail).body, tail


def helper_sources(path):
    _, nodes, tail = split_at_banner(path)
    return {node.name: ast.get_source_segment(tail, node) for node in nodes if isinstance(node, ast.FunctionDef)}


def is_demo_guard(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


@pytest.mark.parametrize("path", MECHANISMS, ids=lambda p: p.stem)
def test_only_shared_helpers_follow_the_banner(path):
    head, nodes, _ = split_at_banner(path)
    for i, node in enumerate(nodes):
        if is_demo_guard(node):
            assert i == len(nodes) - 1, f"{path.name}: the `if __name__ == '__main__':` guard must be the last thing"
            continue
        assert isinstance(node, ast.FunctionDef) and node.name.startswith("_"), (
            f"{path.name}: line {node.lineno} after the banner: only the shared `_check_*`/mask helpers "
            f"(and the closing demo guard) belong there; move mechanism code above the banner")
    before = {n.name for n in ast.parse(head).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    shared = {n.name for n in nodes if isinstance(n, ast.FunctionDef)}
    assert not before & shared, f"{path.name}: {sorted(before & shared)} defined both before and after the banner"


def test_every_copy_of_a_shared_helper_is_identical():
    copies = {}
    for path in MECHANISMS:
        for name, source in helper_sources(path).items():
            copies.setdefault(name, {}).setdefault(source, []).append(path.name)
    differing = {name: [files for files in versions.values()] for name, versions in copies.items() if len(versions) > 1}
    assert not differing, (
        "shared helpers whose copies differ (fix one, fix them all); files grouped by version: "
        f"{differing}")
