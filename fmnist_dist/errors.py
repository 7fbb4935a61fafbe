"""Errors worded for the user. The command line turns any of them into one line
`fmnist-dist: error: ...` and exit status 2."""
from __future__ import annotations


class FmnistError(Exception):
    """Base of every error that is the user's to fix (input, environment), not a bug."""


class SetupError(FmnistError):
    """The software or hardware environment cannot do what the config asks (ITEX requested but not
    installed, bf16 requested on a CPU without it, a node failing the preflight)."""
