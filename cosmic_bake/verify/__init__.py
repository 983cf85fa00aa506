"""Checking a baked model and measuring an edit.

- ``logits``: the baked model against the original with the runtime hook (``verify``, ``verify_gguf``).
- ``tolerances``: the pass thresholds per storage dtype and per GGUF tensor class.
- ``reference``: the unedited file of the same runtime and type that a GGUF verify measures too.
- ``weights`` (+ ``weights_math``, ``weights_report``, ``weights_gguf``): the prompt-free weight-space check.
- ``evaluate``: refusal rates and KL of generations, with or without an intervention.
"""
