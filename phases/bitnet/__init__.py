"""Phase 4, BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv 2402.17764), in plain
PyTorch (the Ray driver is ``coordinator/drivers/bitnet.py``).

- ``quant``: the absmean ternary weight quantizer (per tensor; optionally with a per-layer
  sparsity threshold), the 8-bit absmax activation quantizer (per token), the straight-through
  estimator, ``BitLinear``, ``ternary_linear`` (the inference arithmetic) and ``replace_linears``
  (any HF causal LM; lm_head and embeddings stay in full precision).
- ``calibrate``: activation statistics of the layers to quantize, per-layer thresholds chosen on
  them, SubLN for Cognate models with calibrated gains.
- ``packing``: ternary weights packed at 2 bits per weight (four per byte) or at 1.6 bits per
  weight (five trits per byte, base 3), lossless.
- ``packed``: ``PackedBitLinear`` (inference from the packed codes: the ``decode`` or the x86
  ``int8`` kernel) and the packed model file (``save_packed`` / ``load_packed``, bit-exact).
- ``config``: the ``bitnet:`` section.  ``train``: the phase (calibrate, quantize, QAT, store,
  measure).

Importing this package imports nothing (no torch); import the submodules explicitly.
"""
