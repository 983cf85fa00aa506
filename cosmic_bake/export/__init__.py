"""Exporting a baked model: checkpoint file formats (safetensors shards and their index) and the model card.

Format I/O only: which tensors to write and how to edit them is decided in :mod:`cosmic_bake.bake`.
"""
