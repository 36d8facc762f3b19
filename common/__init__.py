"""Helpers shared by several modules of the tutorial.

Each submodule holds one concern; a helper lives here only once two or more modules use it:

- ``seeding``   : seed Python, numpy and torch in one call; opt-in deterministic mode; seeded
                  generators on a device (make_generator) and a check that one matches a tensor
- ``device``    : pick cuda, then mps, then cpu
- ``cli``       : the flags every module accepts (--quick, --device, --seed, --outdir, ...),
                  each flag's allowed range (memory and time included), the summary table
- ``progress``  : progress bars in a terminal or a notebook, none in a log
- ``plotting``  : headless figures saved to outputs/<module>/, shared plot helpers
- ``notebook``  : each module as a Jupyter notebook (python -m common.notebook NN), its runs
                  there (notebook_run); needs requirements-notebooks.txt to convert
- ``datasets``  : 2D toy data (with exact scores for Gaussian mixtures) and image loaders
- ``metrics``   : sample-quality distances (MMD, sliced Wasserstein) and the data-vs-data floor
- ``training``  : expand_to (broadcast a per-sample sigma or t over x) and the EMA of weights
- ``modules``   : load ``01_score_functions_basics.py`` and friends by number
- ``exercises`` : the machinery that lists and checks the exercises at the end of each module
- ``course``    : ``python -m common.course`` runs the modules in order and tabulates
                  what each measured
"""
