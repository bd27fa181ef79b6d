"""examples/mechanism_figures.py: one figure function per mechanism page, and each page's figure exists."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mechanism_figures", ROOT / "examples" / "mechanism_figures.py")
mechanism_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mechanism_figures)


def test_every_figure_belongs_to_a_mechanism_file():
    stems = {p.stem for p in (ROOT / "mechanisms").glob("*.py")}
    assert set(mechanism_figures.FIGURES) <= stems, set(mechanism_figures.FIGURES) - stems


@pytest.mark.parametrize("page", sorted((ROOT / "docs" / "mechanisms").glob("[!_]*.md")), ids=lambda p: p.stem)
def test_each_figure_a_page_shows_is_committed_and_drawn_by_the_script(page):
    for name in re.findall(r"\]\((figures/[^)]+\.png)\)", page.read_text(encoding="utf-8")):
        assert (page.parent / name).is_file(), f"{page.name} shows {name}, which is not in the repository"
        assert pathlib.Path(name).stem in mechanism_figures.FIGURES, f"no function draws {name}"


def test_the_script_draws_a_figure(tmp_path):
    assert mechanism_figures.main(["alibi", "--out", str(tmp_path)]) == 0
    png = tmp_path / "alibi.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_figure_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mechanism_figures.main(["no_such_mechanism"])
    assert exit_info.value.code == 2
    assert "unknown figure(s) no_such_mechanism" in capsys.readouterr().err
