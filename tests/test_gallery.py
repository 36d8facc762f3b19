"""docs/make_gallery.py on fake chapter outputs (tiny PNGs in a tmp folder): thumbnails of the
right width, exit code 2 naming what is missing, --skip-missing, and figure names that the
chapters really save."""

import importlib.util
import re

import numpy as np
import pytest
from matplotlib import image

from common.modules import ROOT

SCRIPT = ROOT / "docs" / "make_gallery.py"


@pytest.fixture(scope="module")
def gallery():
    spec = importlib.util.spec_from_file_location("make_gallery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_outputs(gallery, outdir, leave_out=()):
    """A 1000 x 250 RGB PNG where each chapter's gallery figure would be."""
    pixels = np.broadcast_to(np.linspace(0, 1, 1000)[None, :, None], (250, 1000, 3))
    for chapter, figure in gallery.FIGURES.items():
        if chapter not in leave_out:
            (outdir / chapter).mkdir(parents=True)
            image.imsave(outdir / chapter / f"{figure}.png", pixels)


def test_thumbnails_are_written_at_the_requested_width(gallery, tmp_path, capsys):
    fake_outputs(gallery, tmp_path / "out")
    dest = tmp_path / "gallery"
    assert gallery.main(["--outdir", str(tmp_path / "out"), "--dest", str(dest)]) == 0
    written = sorted(p.name for p in dest.iterdir())
    assert written == sorted(f"{chapter}.png" for chapter in gallery.FIGURES)
    height, width = image.imread(dest / written[0]).shape[:2]
    assert (width, height) == (480, 120)  # 1000 x 250 scaled by 0.48


def test_a_missing_figure_stops_with_one_line_naming_it(gallery, tmp_path, capsys):
    fake_outputs(gallery, tmp_path / "out", leave_out=["09_image_generation"])
    dest = tmp_path / "gallery"
    assert gallery.main(["--outdir", str(tmp_path / "out"), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    figure = gallery.FIGURES["09_image_generation"]
    assert str(tmp_path / "out" / "09_image_generation" / f"{figure}.png") in err
    assert "01_score_functions_basics" not in err and not dest.exists()  # nothing half-done


def test_skip_missing_writes_the_others(gallery, tmp_path, capsys):
    fake_outputs(gallery, tmp_path / "out", leave_out=["10_advanced_applications"])
    dest = tmp_path / "gallery"
    assert gallery.main(["--outdir", str(tmp_path / "out"), "--dest", str(dest),
                         "--skip-missing"]) == 0
    assert len(list(dest.iterdir())) == len(gallery.FIGURES) - 1
    assert "skipped 10_advanced_applications" in capsys.readouterr().out


def test_small_figures_are_not_enlarged(gallery, tmp_path):
    source, target = tmp_path / "small.png", tmp_path / "thumb.png"
    image.imsave(source, np.zeros((30, 200, 3)))
    gallery.thumbnail(source, target, 480)
    assert image.imread(target).shape[:2] == (30, 200)


def test_every_gallery_figure_is_one_its_chapter_saves(gallery):
    """The names in FIGURES follow the chapters: each is a chapter file, and the figure name is
    in that chapter's source (a run.save name, or the f-string it comes from, named in prose)."""
    chapters = {p.stem for p in ROOT.glob("[0-9][0-9]_*.py")}
    assert set(gallery.FIGURES) == chapters
    for chapter, figure in gallery.FIGURES.items():
        source = (ROOT / f"{chapter}.py").read_text()
        assert re.search(rf"[\"`]{figure}(\.png)?[\"`]", source), (chapter, figure)


def test_readme_table_shows_every_gallery_figure(gallery):
    readme = (ROOT / "README.md").read_text()
    for chapter in gallery.FIGURES:
        assert f'<img src="docs/gallery/{chapter}.png"' in readme, chapter
