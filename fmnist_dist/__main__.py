"""`python -m fmnist_dist`: the command line (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
