"""Phase 8, compression: the algorithms in plain PyTorch (the agent team that runs them is
``actors/compression/``, issue #5). Built so far: the weight codecs, each returning an object
with ``.bits_per_weight`` (every stored bit counted), ``.nbytes`` and ``.decompress()``:

- ``phases.compression.seedlm.compress(weight, *, block=8, latent=3, seed_bits=16)``: SeedLM,
  weight blocks as LFSR seeds plus 4-bit coefficients with a shared exponent;
- ``phases.compression.vptq.compress(weight, *, hessian=None, vector_len=4, centroids=256,
  residual_centroids=0)``: VPTQ, Hessian-weighted k-means codebooks with GPTQ error feedback;
- ``phases.compression.rtn.compress(weight, *, bits=8, group_size=None)``: round-to-nearest
  with per-group scales, the baseline and the int8 format.

Also: ``pruning`` (magnitude, structured heads/neurons, first-order Taylor; the progressive
20/40/60% schedule) and ``distill`` (response- and feature-based distillation losses, T = 4.0,
alpha = 0.7).
"""
