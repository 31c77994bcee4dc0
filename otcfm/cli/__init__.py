"""The ``otcfm`` command: ``otcfm train``, ``otcfm sample``, ``otcfm reflow`` and ``otcfm distill``.

``parser.py`` holds the top level (no torch), ``options.py`` each subcommand's options, ``train.py``, ``sample.py``
and ``pairs.py`` the subcommands, ``runs.py`` what they share about runs, ``main.py`` the entry.
"""

from otcfm.cli.main import main, run

__all__ = ["main", "run"]
