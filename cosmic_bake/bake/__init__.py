"""Bake the refusal direction edit into a checkpoint's weights (spec section 6).

Every module that writes into the residual stream gets its output orthogonalised, so the stream
never carries the direction: ``W <- (I - r r^T) W`` for output-side weights ``[d, *]`` (attention
output and MLP down projections, every expert's and shared expert's), ``b <- b - (b . r) r`` for
their biases, ``E <- E (I - r r^T)`` for the token embedding (and additive position embeddings).
A writer followed by a norm with gain ``g`` (Gemma's sandwich norms) is orthogonalised against
``u = unit(g * r)`` instead, exactly what the runtime hook removes (``hooks.writer_directions``).

Three steps, each testable on its own:

1. **Layout** (:func:`~cosmic_bake.model.layout.model_layout`): which parameters are writers,
   post-writer norms and embeddings, by in-memory name, for every layer, and how on-disk names
   map to them (see :mod:`cosmic_bake.model.layout`).
2. **Plan** (:func:`~cosmic_bake.bake.plan.plan_bake`): pure; from the layout and the tensor names, shapes and
   dtypes of the safetensors headers (:func:`~cosmic_bake.export.safetensors_read.list_weights`),
   one :class:`~cosmic_bake.bake.plan.TensorEdit` per output tensor (``rows``, ``expert_rows``, ``cols``,
   ``expert_cols``, ``bias`` or ``copy``) and the output shard layout.
3. **Apply** (:func:`~cosmic_bake.bake.folder.bake_folder`): each output shard is streamed out by
   :func:`~cosmic_bake.export.safetensors_write.write_safetensors`; an edited tensor is read with
   plain file reads (not ``safe_open``, whose memory map would count the whole shard's page
   cache on top of the copy being edited), edited in place in float64 chunks, cast back to the
   source dtype and written, one at a time; unedited tensors are copied byte for byte. Peak
   memory is about the largest edited tensor. The card comes from :mod:`cosmic_bake.export.card`.

Every mode in :data:`~cosmic_bake.model.hooks.BAKED_MODES` is baked: ``ablate`` (the removal
above), ``scale`` (the same projection with coefficient ``-beta``, scaling the component by
``1 + beta``), and ``add`` / ``affine``, whose constant vector is placed by :mod:`.constant` (on every
token embedding row for layer 0, else on a bias of the MLP down projection before the layer). The output appears
atomically (``outputs.atomic_dir``); the source folder is only read.

Modules: ``plan`` (the pure plan), ``apply`` (the edits and the shard sources), ``constant`` (where
the constant goes), ``folder`` (:func:`~cosmic_bake.bake.folder.bake_folder`, a transformers folder),
``gguf_edit`` (bake a GGUF file in place of its tensors), ``gguf`` (the ``--format gguf`` route and its manifest).
"""
