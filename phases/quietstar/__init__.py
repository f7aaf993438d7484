"""Phase 3, Quiet-STaR (Zelikman et al. 2024, "Quiet-STaR: Language Models Can Teach Themselves
to Think Before Speaking", arXiv 2403.09629; reference code ezelikman/quiet-star): the
model-agnostic building blocks, in plain PyTorch.

- ``config``: ``QuietStarConfig``, the phase's config section (thought length, thoughts per
  position, teacher-forced true tokens, sampling, REINFORCE and loss weights, injection).
- ``mask``: the layout, attention mask and position ids of the extended sequence that holds a
  thought at every position, generated in parallel without a KV cache.
- ``sampling``: thought tokens by temperature and nucleus (top-p) sampling, with the
  start/end-of-thought ids masked out.
- ``mixing``: ``MixingHead``, the reference's "complex talk head" that mixes the hidden state
  with and without the thought; it starts at weight 0 (the base model exactly).
- ``reinforce``: rewards (log-likelihood improvement of the true future tokens), the mean
  baseline over a position's thoughts, the policy-gradient loss and the total loss.

Not built yet: the model integration, the phase's training loop and its driver; phase 3 still
refuses to run (``coordinator/drivers/__init__.py`` registers it as unbuilt).

Importing this package imports nothing (no torch); import the submodules explicitly.
"""
