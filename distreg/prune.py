"""Placeholder: filled in by its owner."""


def add_commands(sub) -> None:
    """Add this module's subcommands to `sub` (an argparse subparsers object)."""
