"""Exact parameter targeting for the Cognate family (the reference's Phase 1: "exact parameter
targeting", e.g. 25,069,534 parameters at d_model 216, 11 layers, 4 heads, vocab 32,000).

:func:`count_params` is the analytic parameter count of ``CognateForCausalLM``; a test checks it
equals ``sum(p.numel() for p in model.parameters())`` of the built model. :func:`solve_shape`
searches the free dimensions (d_model, n_layers, d_ff; heads follow d_model) for the shape
closest to a target and reports its exact count. With d_model and n_layers fixed only d_ff
moves, in steps of 3 * d_model * n_layers parameters (7,128 at the reference shape, 0.03%).
"""

from __future__ import annotations

import math

from coordinator.errors import ConfigError

__all__ = ["count_params", "solve_shape", "pick_heads"]


def count_params(*, vocab_size: int, d_model: int, n_layers: int, d_ff: int, tie_embeddings: bool = False,
                 act_max_steps: int = 8, memory_slots: int = 64, memory_dim: int | None = None) -> int:
    """Exact number of parameters of a CognateForCausalLM of this shape.

    Args:
        vocab_size: V.  d_model: C.  n_layers: blocks (the last one is the pondered block).
        d_ff: SwiGLU width.  tie_embeddings: share the LM head with the embeddings.
        act_max_steps: training step cap (sizes the step embeddings).
        memory_slots: S.  memory_dim: m (default C).
    Returns:
        The count (heads do not change it).
    """
    c, m = d_model, memory_dim or d_model
    embeddings = vocab_size * c * (1 if tie_embeddings else 2)
    block = 2 * c + 4 * c * c + 3 * c * d_ff  # two RMSNorms, q/k/v/o, gate/up/down
    act = act_max_steps * c + c + 1  # step embeddings + halting unit
    memory = c + 3 * c * m + memory_slots * m + m * c + 3 * c + 3  # norm, q/k/v, slots, out, gates
    return embeddings + n_layers * block + act + memory + c  # + final norm


def pick_heads(d_model: int, head_dim: int = 64) -> int:
    """Heads for d_model: the divisor giving an even head dimension closest to ``head_dim``."""
    options = [h for h in range(1, d_model // 2 + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    if not options:
        raise ValueError(f"d_model {d_model} has no even head dimension")
    return min(options, key=lambda h: (abs(d_model / h - head_dim), h))


def solve_shape(target_params: int, vocab_size: int, *, d_model: int | None = None, n_layers: int | None = None,
                n_heads: int | None = None, d_ff: int | None = None, tie_embeddings: bool = False,
                act_max_steps: int = 8, memory_slots: int = 64, memory_dim: int | None = None,
                tolerance: float = 1e-3, ffn_ratio: float = 4.0, aspect_ratio: float = 20.0,
                d_model_step: int = 8) -> tuple[dict[str, int], int]:
    """Choose the model shape whose exact parameter count is closest to ``target_params``.

    Given dimensions stay fixed; the rest are searched: d_model over multiples of
    ``d_model_step`` (and of 2 * n_heads when heads are given) up to 4096, n_layers over 1..64,
    d_ff solved in closed form. Among shapes within ``tolerance``, the one nearest a
    conventional shape wins (d_ff / d_model near ``ffn_ratio``, d_model / n_layers near
    ``aspect_ratio``), then the smaller error.

    Args:
        target_params: wanted parameter count.
        vocab_size: V (from the tokenizer).
        d_model, n_layers, n_heads, d_ff: fixed dimensions, or None to search.
        tie_embeddings, act_max_steps, memory_slots, memory_dim: as in :func:`count_params`.
        tolerance: allowed relative error |count - target| / target.
    Returns:
        ({"d_model", "n_layers", "n_heads", "d_ff"}, exact parameter count).
    Raises:
        ConfigError: key ``target_params`` when no shape is within tolerance (the message
            gives the closest count found).
    """
    if target_params <= 0:
        raise ConfigError("target_params must be positive", [("target_params", "must be > 0")])
    step = d_model_step if n_heads is None else math.lcm(d_model_step, 2 * n_heads)
    dims = [d_model] if d_model is not None else list(range(step, 4097, step))
    layers = [n_layers] if n_layers is not None else list(range(1, 65))
    free_ffn = d_ff is None
    best: tuple | None = None
    closest: tuple[int, int] | None = None  # (abs error, count) over all shapes tried
    for c in dims:
        for n in layers:
            if free_ffn:
                base = count_params(vocab_size=vocab_size, d_model=c, n_layers=n, d_ff=0,
                                    tie_embeddings=tie_embeddings, act_max_steps=act_max_steps,
                                    memory_slots=memory_slots, memory_dim=memory_dim)
                exact = (target_params - base) / (3 * c * n)
                candidates = {max(1, math.floor(exact)), max(1, math.ceil(exact))}
                if d_model is None or n_layers is None:  # keep searched shapes conventional
                    candidates = {f for f in candidates if c <= f <= 8 * c}
            else:
                candidates = {d_ff}
            for f in candidates:
                count = count_params(vocab_size=vocab_size, d_model=c, n_layers=n, d_ff=f,
                                     tie_embeddings=tie_embeddings, act_max_steps=act_max_steps,
                                     memory_slots=memory_slots, memory_dim=memory_dim)
                err = abs(count - target_params)
                if closest is None or err < closest[0]:
                    closest = (err, count)
                if err > tolerance * target_params:
                    continue
                score = (abs(math.log(f / (ffn_ratio * c))) + abs(math.log(c / n / aspect_ratio)), err)
                if best is None or score < best[0]:
                    best = (score, c, n, f, count)
    if best is None:
        got = f"; the closest shape has {closest[1]:,} parameters" if closest else ""
        msg = f"no shape reaches {target_params:,} parameters within {tolerance:.2%}{got}"
        raise ConfigError(msg, [("target_params", msg)])
    _, c, n, f, count = best
    heads = n_heads if n_heads is not None else pick_heads(c)
    if c % heads or (c // heads) % 2:
        msg = f"d_model {c} is not divisible by n_heads {heads} into an even head dimension"
        raise ConfigError(msg, [("n_heads", msg)])
    return {"d_model": c, "n_layers": n, "n_heads": heads, "d_ff": f}, count
