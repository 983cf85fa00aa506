"""cosmic-bake: find a model's refusal direction with COSMIC and bake it into exported weights.

The data flow is select -> bake -> export -> verify; see the README for the tour.
"""

from __future__ import annotations

__version__ = "0.1.0"
