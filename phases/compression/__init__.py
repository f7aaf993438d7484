"""Phase 8, final compression: the algorithms in plain PyTorch. The agent team that runs them is
``actors/compression/`` (nine roles, the orchestrator's task graph); the phase driver is
``coordinator/drivers/compress.py``.

Weight codecs, each returning an object with ``.bits_per_weight`` (every stored bit counted),
``.nbytes`` and ``.decompress()``:

- ``seedlm.compress(weight, *, block=8, latent=3, seed_bits=16)``: SeedLM, weight blocks as LFSR
  seeds plus 4-bit coefficients with a shared exponent;
- ``vptq.compress(weight, *, hessian=None, vector_len=4, centroids=256, residual_centroids=0)``:
  VPTQ, Hessian-weighted k-means codebooks with GPTQ error feedback;
- ``rtn.compress(weight, *, bits=8, group_size=None)``: round-to-nearest with per-group scales;
- ``codecs.encode(weight, codec, settings, sparse=...)``: all of them (and fp16/fp32) by name,
  with ``sparse.SparseTensor`` (a 1-bit keep-mask plus the kept values) for pruned weights.

Stages: ``analyze`` (measured per-matrix sensitivity), ``pruning`` (magnitude, structured,
first-order Taylor; the progressive 20/40/60% schedule), ``student`` (narrower FFNs),
``distill`` (response- and feature-based distillation, T = 4.0, alpha = 0.7), ``calibrate``
(GPTQ Hessians). Choosing and shipping: ``search`` (Pareto front, NSGA-II over one codec per
matrix, the 0.4 compression / 0.6 retention score), ``evaluate`` (retention, parity, the
quality gate), ``profile`` (latency, throughput, peak memory, bytes on disk), ``package`` (the
compressed checkpoint and its loader), ``export`` (ONNX with onnxruntime parity; TensorRT and
mobile statuses). ``config`` is the ``compress:`` section.
"""
