"""Stage 1: prompts -> activations -> candidates -> scores -> one chosen direction.

COSMIC (spec sections 1-4) scores every (position, layer) candidate by cosine similarity of
block outputs, never by reading the model's text. The refusal-token baseline of Arditi et al.
(``selector="refusal-score"``) is here for comparison. Score with the intervention you will ship:
``mode="ablate"`` scores linear removal and addition (LCE); ``mode="affine"`` scores the affine
edit weights can carry (hook ``pin``: removal by every writer, ACE's constant at the candidate's
layer), at alpha 0 (comply) and 1 (refuse); ``mode="ace"`` scores the paper's ACE applied at the
candidate's layer only (runtime hooks only: not bakeable).

Modules: ``candidates`` (collect), ``scoring`` (COSMIC and the refusal-score baseline), ``selection``
(``select``), ``run_folder`` (write a run folder), ``sweep`` (alpha sweep), ``compare`` (selectors side by side).
"""
