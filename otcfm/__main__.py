"""``python -m otcfm ...``: the command line, as the ``otcfm`` command runs it (see :mod:`otcfm.cli`)."""

from otcfm.cli import run

if __name__ == "__main__":
    run()
