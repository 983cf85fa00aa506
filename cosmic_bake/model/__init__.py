"""Model plumbing: loading, the architecture probe, chat formatting, hooks and forward passes."""
