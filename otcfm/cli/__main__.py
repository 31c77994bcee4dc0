"""``python -m otcfm.cli ...`` (and ``torchrun ... -m otcfm.cli``): the ``otcfm`` command."""

from otcfm.cli.main import run

if __name__ == "__main__":
    run()
