"""The application floor: what people run, built on everything below.

``cli`` (the ``offloadlab`` console script), ``sweep`` (grids of configurations through any
``concurrent.futures`` executor, cached), ``optimize`` (search the offload policies and explain the
pick), ``study`` (the before-buying study), ``paper`` (the paper's scenario), ``plots`` (matplotlib
Figures), ``outputs`` (all-or-nothing output files), ``pool`` (the worker processes a command owns: a
sweep's, the band's corner runs, the painter of a PNG) and ``signals`` (Ctrl-C and SIGTERM in the CLI
and its workers). Nothing below (the vocabulary, ``sim``, ``runtime``, ``validation``) imports
from here.
"""
