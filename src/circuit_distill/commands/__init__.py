"""CLI subcommands: each module here defines ``register(subparsers)``; ``cli.py`` finds them all.

A module's ``register`` adds one (or a few) ``argparse`` subparsers and sets ``func`` on each,
a callable taking the parsed ``args`` and returning an exit code (or None for 0).
"""
