import sys

from .job import cli

sys.exit(cli())
