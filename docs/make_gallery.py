"""Make the README's gallery: one representative figure per chapter, shrunk to a thumbnail.

Each chapter writes its figures to ``<outdir>/<chapter>/<figure>.png``; this script copies the one
named in ``FIGURES`` to ``docs/gallery/<chapter>.png``, scaled to ``--width`` pixels (480 by
default: 30-130 kB per figure, under 600 kB in all, so the gallery stays small in git). It reads
the chapters' outputs and runs nothing itself: run the chapters first, with their default
settings (a --quick run's figures only show that the code runs).

    for f in [0-9][0-9]_*.py; do python "$f"; done
    python docs/make_gallery.py                    # from outputs/, into docs/gallery/
    python docs/make_gallery.py --skip-missing     # refresh only the chapters that were run

A missing figure stops it with exit code 2 and one line naming every missing file (nothing is
written), unless ``--skip-missing``. It needs only Pillow, which matplotlib installs for its own
image I/O.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# chapter -> the figure that shows what the chapter is about (the README's "what you will see")
FIGURES = {
    "01_score_functions_basics": "score_fields_2d",  # densities with their score fields
    "02_score_matching_theory": "ism_vs_esm_sweep",  # ISM = ESM - C over a parameter sweep
    "03_langevin_dynamics": "mode_weights_pitfall",  # Langevin misses the 0.8/0.2 weights
    "04_denoising_score_matching": "learned_vs_exact_scores",  # where the learned score errs
    "05_sliced_score_matching": "time_per_step_vs_dimension",  # the cost SSM saves
    "06_score_networks": "samples",  # what each training choice does to samples
    "07_noise_conditional_scores": "samples_per_level",  # annealed Langevin, level by level
    "08_score_sde": "reverse_trajectories",  # reverse SDE and probability-flow ODE paths
    # MNIST digits: weak model, final model, guided (the sampler grid is too wide to read)
    "09_image_generation": "guidance_effect",
    "10_advanced_applications": "guided_cfg",  # digits on request, classifier-free guidance
}


def thumbnail(source: Path, target: Path, width: int) -> None:
    """Write ``source`` scaled to ``width`` pixels wide as ``target`` (never enlarged)."""
    from PIL import Image  # Pillow: matplotlib's own image library, so no extra dependency

    with Image.open(source) as picture:
        picture.thumbnail((width, picture.height))  # keeps the aspect ratio; only shrinks
        # A 256-colour palette: plots have few colours, and smooth colour maps (04's error
        # maps) would otherwise cost 300 kB of git history per refresh for no visible gain.
        picture.convert("RGB").quantize(colors=256).save(target, optimize=True)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=ROOT / "outputs",
                        help="where the chapters wrote their figures (default outputs/)")
    parser.add_argument("--dest", type=Path, default=ROOT / "docs" / "gallery",
                        help="where the thumbnails go (default docs/gallery/)")
    parser.add_argument("--width", type=int, default=480, help="thumbnail width in pixels")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out chapters whose figure is missing instead of stopping")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if not 16 <= args.width <= 4000:
        print(f"error: --width must lie in [16, 4000], got {args.width}", file=sys.stderr)
        return 2
    sources = {chapter: args.outdir / chapter / f"{figure}.png"
               for chapter, figure in FIGURES.items()}
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing and not args.skip_missing:
        print(f"error: missing {', '.join(missing)} (run those chapters first, or pass "
              f"--skip-missing)", file=sys.stderr)
        return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    for chapter, source in sources.items():
        if source.is_file():
            thumbnail(source, args.dest / f"{chapter}.png", args.width)
            print(f"{args.dest / chapter}.png  <-  {source}")
        else:
            print(f"skipped {chapter}: {source} is missing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
