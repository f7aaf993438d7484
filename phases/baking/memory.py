"""Memory optimisations, measured: activation checkpointing, weight tying, and the weight dtype.

- Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
  arXiv 1604.06174): each transformer block, the ACT-pondered block included, runs under
  ``torch.utils.checkpoint`` (non-reentrant), so its inner activations are recomputed in backward
  instead of kept. Measured: the bytes of tensors autograd keeps for backward in one training forward
  (every tensor packed by ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters
  not counted, plus the block inputs a checkpoint keeps alive), the step time (forward + backward, timed
  interleaved) with and without, and the gradients' largest difference. It costs time and saves memory,
  so it is applied only when the activations exceed the caller's budget (:func:`checkpointing_needed`).
- Weight tying (Press & Wolf 2017, arXiv 1608.05859): ``lm_head`` sharing ``embed_tokens``' matrix saves
  its bytes; on a deep copy the LM loss on held-out ids before and after tying decides (applied iff the
  relative rise is at most ``tie_tolerance``).
- dtype: float32, bfloat16, float16 weights, each on a deep copy: weight bytes and the logits' largest
  difference and top-1 agreement with float32; the chosen dtype is the smallest that keeps agreement.

Cognate's HF class does not declare ``supports_gradient_checkpointing``, so :func:`enable_checkpointing`
wraps the forward of every module of a class listed in ``model._no_split_modules`` (its transformer
blocks: ``CognateBlock``, which also is the pondered block ``model.model.act.block``). Models that do
support HF's ``gradient_checkpointing_enable`` use it.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from phases.evomerge.fitness import weight_bytes

from .graph import logits_parity, p50, paired_latency_ms

__all__ = ["activation_bytes", "checkpointing_needed", "disable_checkpointing", "enable_checkpointing",
           "measure_memory", "tie_lm_head"]

DTYPES = ("float32", "bfloat16", "float16")


# -- activation checkpointing --------------------------------------------------------------------------

def _checkpointed_forward(self, *args, **kwargs):
    """Bound to a block by :func:`enable_checkpointing`: checkpoint the original forward when training."""
    original = self.__dict__["_forward_before_ckpt"] or types.MethodType(type(self).forward, self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def _blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _hf_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) \
        and callable(getattr(model, "gradient_checkpointing_enable", None))


def enable_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing per transformer block (in place; idempotent).

    Returns:
        The number of blocks checkpointed (for an HF model that supports it: modules flagged by
        ``gradient_checkpointing_enable``).
    Raises:
        ValueError: the model supports neither HF checkpointing nor names its blocks in ``_no_split_modules``.
    """
    if _hf_checkpointing(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True)
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} supports no HF gradient checkpointing and lists no block "
                         "classes in _no_split_modules; cannot find the blocks to checkpoint")
    for block in blocks:
        if "_forward_before_ckpt" not in block.__dict__:
            block._forward_before_ckpt = block.__dict__.get("forward")  # None: the class's forward
            block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def disable_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_checkpointing`. Returns the number of blocks restored."""
    if _hf_checkpointing(model):
        model.gradient_checkpointing_disable()
        return 0
    restored = 0
    for block in model.modules():
        if "_forward_before_ckpt" in block.__dict__:
            original = block.__dict__.pop("_forward_before_ckpt")
            if original is None:
                del block.forward
            else:
                block.forward = original
            restored += 1
    return restored


def _checkpointing_on(model: nn.Module) -> bool:
    return any("_forward_before_ckpt" in m.__dict__ or getattr(m, "gradient_checkpointing", False) is True
               for m in model.modules())


def checkpointing_needed(activation_bytes: int, budget_bytes: int | float) -> bool:
    """Whether one step's activations exceed the budget (then checkpointing is worth its recompute).

    Raises:
        ValueError: a non-positive budget.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    return activation_bytes > budget_bytes


def _training_step(model: nn.Module, input_ids: torch.Tensor, counter: dict | None = None):
    """One LM-loss forward and backward; returns the gradients (``.grad`` untouched). With ``counter``,
    every tensor saved for backward during the forward is recorded by storage."""
    params = [p for p in model.parameters() if p.requires_grad]
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def record(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            counter[storage.data_ptr()] = storage.nbytes()

    def pack(t):
        record(t)
        return t

    hooks = []
    if counter is not None:  # a checkpoint keeps its inputs alive outside the saved-tensor hooks
        def pre_hook(_module, args, kwargs):
            if torch.is_grad_enabled():
                for a in (*args, *kwargs.values()):
                    if isinstance(a, torch.Tensor):
                        record(a)
        hooks = [b.register_forward_pre_hook(pre_hook, with_kwargs=True)
                 for b in model.modules() if "_forward_before_ckpt" in b.__dict__]
    try:
        if counter is not None:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=input_ids, labels=input_ids).loss
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _with_mode(model: nn.Module, checkpointing: bool, fn):
    """Run ``fn()`` with the model in train mode and checkpointing on/off; both restored after."""
    was_training, was_on = model.training, _checkpointing_on(model)
    model.train()
    (enable_checkpointing if checkpointing else disable_checkpointing)(model)
    try:
        with torch.enable_grad():
            return fn()
    finally:
        (enable_checkpointing if was_on else disable_checkpointing)(model)
        model.train(was_training)


def activation_bytes(model: nn.Module, input_ids: torch.Tensor, *, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one training forward (LM loss, labels = input_ids).

    Each distinct storage counts once by its data pointer; parameters count zero. The backward runs too
    (gradients are returned by ``autograd.grad``, so ``.grad`` stays untouched). The model's train/eval
    mode and checkpointing state are restored.
    """
    counter: dict[int, int] = {}
    _with_mode(model, checkpointing, lambda: _training_step(model, input_ids, counter))
    return sum(counter.values())


# -- weight tying --------------------------------------------------------------------------------------

def _tie_pair(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    return (get_in() if callable(get_in) else None), (get_out() if callable(get_out) else None)


def tie_lm_head(model: nn.Module) -> int:
    """Tie the output projection to the input embeddings (in place). Returns the bytes saved.

    Raises:
        ValueError: no input/output embeddings, or their shapes differ.
    """
    emb, head = _tie_pair(model)
    if emb is None or head is None or emb.weight.shape != head.weight.shape:
        raise ValueError(f"cannot tie: embeddings {None if emb is None else tuple(emb.weight.shape)}, "
                         f"output projection {None if head is None else tuple(head.weight.shape)}")
    if head.weight is emb.weight:
        return 0
    saved = head.weight.numel() * head.weight.element_size()
    head.weight = emb.weight
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = True
    return saved


@torch.no_grad()
def _lm_loss(model: nn.Module, input_ids: torch.Tensor) -> float:
    return float(model(input_ids=input_ids, labels=input_ids).loss)


def _measure_tying(model: nn.Module, input_ids: torch.Tensor, tie_tolerance: float) -> dict:
    emb, head = _tie_pair(model)
    if emb is None or head is None:
        return {"already_tied": False, "applied": False, "reason": "the model has no input/output embeddings"}
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        return {"already_tied": True, "bytes_saved": 0, "applied": False, "reason": "lm_head is already tied"}
    if head.weight.shape != emb.weight.shape:
        return {"already_tied": False, "applied": False,
                "reason": f"shapes differ: lm_head {tuple(head.weight.shape)}, embeddings {tuple(emb.weight.shape)}"}
    tied = copy.deepcopy(model).eval()
    saved = tie_lm_head(tied)
    before, after = _lm_loss(model, input_ids), _lm_loss(tied, input_ids)
    rise = (after - before) / max(abs(before), 1e-12)
    entry = {"already_tied": False, "bytes_saved": saved, "loss_before": before, "loss_after": after,
             "relative_loss_increase": rise, "applied": rise <= tie_tolerance}
    entry["reason"] = (f"held-out loss rises {rise:+.2%} {'<=' if entry['applied'] else '>'} tolerance "
                       f"{tie_tolerance:.2%}; tying saves {saved} bytes")
    return entry


# -- dtype ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _measure_dtypes(model: nn.Module, input_ids: torch.Tensor, min_agreement: float) -> dict:
    reference = model(input_ids=input_ids).logits.float()
    table: dict[str, dict] = {}
    for name in DTYPES:
        try:
            cast = copy.deepcopy(model).to(getattr(torch, name)).eval()
            entry = {"weight_bytes": weight_bytes(cast), "ok": True}
            entry |= logits_parity(reference, cast(input_ids=input_ids).logits)
            del cast
        except Exception as exc:  # noqa: BLE001 - a dtype unsupported on this device is a result, not a crash
            entry = {"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
        table[name] = entry
    usable = [n for n in DTYPES if table[n]["ok"] and table[n]["top1_agreement"] >= min_agreement]
    chosen = min(usable, key=lambda n: (table[n]["weight_bytes"], -table[n]["top1_agreement"]), default="float32")
    if usable:
        reason = (f"{chosen}: smallest weights ({table[chosen]['weight_bytes']} bytes) with top-1 agreement "
                  f"{table[chosen]['top1_agreement']:.4f} >= {min_agreement}")
    else:
        reason = f"no dtype reached top-1 agreement {min_agreement}; keeping float32"
    return {"dtypes": table, "chosen": chosen, "applied": chosen != "float32", "reason": reason}


# -- the whole measurement -----------------------------------------------------------------------------

def _measure_checkpointing(model, input_ids, repeats, budget_bytes) -> dict:
    without = activation_bytes(model, input_ids, checkpointing=False)
    with_ckpt = activation_bytes(model, input_ids, checkpointing=True)
    grads_plain = _with_mode(model, False, lambda: _training_step(model, input_ids))
    grads_ckpt = _with_mode(model, True, lambda: _training_step(model, input_ids))
    diff = max((float((a - b).abs().max()) for a, b in zip(grads_plain, grads_ckpt)), default=0.0)
    times = paired_latency_ms(
        {"without": lambda: _with_mode(model, False, lambda: _training_step(model, input_ids)),
         "with": lambda: _with_mode(model, True, lambda: _training_step(model, input_ids))},
        repeats=repeats, warmup=1, device=input_ids.device)
    entry = {"activation_bytes_without": without, "activation_bytes_with": with_ckpt,
             "reduction": without / max(with_ckpt, 1), "step_ms_without": p50(times["without"]),
             "step_ms_with": p50(times["with"]), "grad_max_abs_diff": diff, "parity": diff <= 1e-5,
             "budget_bytes": budget_bytes}
    entry["slowdown"] = entry["step_ms_with"] / max(entry["step_ms_without"], 1e-9)
    entry["needed"] = None if budget_bytes is None else checkpointing_needed(without, budget_bytes)
    if not entry["parity"]:
        entry["applied"], entry["reason"] = False, f"gradients differ by {diff:.3g} with checkpointing"
    elif budget_bytes is None:
        entry["applied"] = False
        entry["reason"] = "no activation budget given; apply when checkpointing_needed(activation bytes, budget)"
    elif entry["needed"]:
        entry["applied"] = True
        entry["reason"] = (f"activations {without} bytes exceed the budget {int(budget_bytes)}; checkpointing cuts "
                           f"them {entry['reduction']:.2f}x at {entry['slowdown']:.2f}x step time")
    else:
        entry["applied"] = False
        entry["reason"] = (f"activations {without} bytes fit the budget {int(budget_bytes)}; checkpointing would "
                           f"only cost time ({entry['slowdown']:.2f}x step time)")
    return entry


def measure_memory(model: nn.Module, input_ids: torch.Tensor, *, tie_tolerance: float = 0.01,
                   min_agreement: float = 0.99, budget_bytes: int | float | None = None, repeats: int = 3) -> dict:
    """Measure checkpointing, weight tying and dtypes for ``model`` on ``input_ids`` (B, T).

    ``model`` is not modified (tying and casting happen on deep copies; checkpointing and train mode are
    restored). ``budget_bytes`` is the activation budget of one training step (None: not decided).

    Returns:
        ``{"checkpointing": {"activation_bytes_without", "activation_bytes_with", "reduction", "step_ms_without",
        "step_ms_with", "slowdown", "grad_max_abs_diff", "parity", "needed", "applied", "reason"},
        "weight_tying": {"already_tied", "bytes_saved", "loss_before", "loss_after", "relative_loss_increase",
        "applied", "reason"}, "dtype": {"dtypes": {name: {"weight_bytes", "max_abs_diff", "top1_agreement",
        "ok"} | {"ok": False, "reason"}}, "chosen", "applied", "reason"}}``.
    """
    was_training = model.training
    try:
        out = {"checkpointing": _measure_checkpointing(model, input_ids, repeats, budget_bytes)}
        model.eval()
        out["weight_tying"] = _measure_tying(model, input_ids, tie_tolerance)
        out["dtype"] = _measure_dtypes(model, input_ids, min_agreement)
    finally:
        model.train(was_training)
    return out
