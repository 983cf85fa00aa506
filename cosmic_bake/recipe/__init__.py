"""Recipes: ``file`` reads a recipe TOML (with ``--set`` overrides) into per-step options; ``runner`` plans
the steps of ``cosmic-bake run`` and runs them, resumably, with the command objects its caller passes.
"""
