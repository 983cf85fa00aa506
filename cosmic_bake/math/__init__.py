"""Pure tensor math: no models, no files.

Every function here takes and returns tensors (or plain numbers) so it can be tested against a
direct transcription of the formulas in ``docs/cosmic-spec.md`` without loading a model.
"""
