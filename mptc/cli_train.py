"""`mptc train` and `mptc search` (registered into the main parser by mptc/cli.py)."""

from __future__ import annotations

import argparse

COMMANDS: dict = {}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `mptc` parser."""
