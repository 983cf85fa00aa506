"""``python -m cosmic_bake``: the command line."""

from cosmic_bake.cli import main

main()
