"""Command line: ``stpredict demo``."""

from __future__ import annotations

import argparse

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stpredict`` command."""
    parser = argparse.ArgumentParser(prog="stpredict")
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(argv)
    return 0
