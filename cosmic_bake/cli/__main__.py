"""``python -m cosmic_bake.cli``."""

from cosmic_bake.cli import main

main()
