"""Phase 4, BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv 2402.17764): the
building blocks, in plain PyTorch.

- ``quant``: the absmean ternary weight quantizer (per tensor), the 8-bit absmax activation
  quantizer (per token), the straight-through estimator, ``BitLinear`` and
  ``replace_linears`` (any HF causal LM; lm_head and embeddings stay in full precision).
- ``packing``: ternary weights packed at 2 bits per weight (four per byte) or at 1.6 bits per
  weight (five trits per byte, base 3), lossless.
- ``packed``: ``PackedBitLinear`` (inference from the packed codes, int8 products) and the packed
  model file (``save_packed`` / ``load_packed``, bit-exact).

Not built yet: calibration, QAT training, the driver; phase 4 still refuses
to run (``coordinator/drivers/__init__.py`` registers it as unbuilt, issue #7).

Importing this package imports nothing (no torch); import the submodules explicitly.
"""
