"""Structural transforms of a Cognate model that phase 7 (ADAS) composes into deployment recipes.

- ``drop_layers``: depth pruning by ShortGPT's Block Influence (Men et al. 2024, "ShortGPT: Layers
  in Large Language Models are More Redundant Than You Expect", arXiv:2403.03853):
  BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)] over the tokens of calibration batches; the blocks whose
  output is most similar to their input matter least and are removed.
- ``prune_ffn``: structured FFN width pruning with an activation-times-weight score, the
  neuron-level form of Wanda (Sun et al. 2023, arXiv:2306.11695) as used for structured pruning
  by FLAP (An et al. 2024, arXiv:2312.11983) and Minitron (Muralidharan et al. 2024,
  arXiv:2407.14679): neuron j scores E_t|h_j| * ||W_down[:, j]||.
- ``low_rank``: truncated-SVD factorisation of Linears (Eckart-Young; the low-rank compression
  of Denton et al. 2014, arXiv:1404.0736), W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T), stored as
  ``phases.cognate.modeling.LowRankLinear`` and recorded in ``config.linear_ranks`` so the
  result reloads with ``AutoModelForCausalLM.from_pretrained``.

Every transform deep-copies its input (left untouched), returns the copy in eval mode, uses no
randomness, and keeps the config consistent with the modules (``num_hidden_layers``,
``intermediate_size``, ``linear_ranks``), so transforms compose in any order and each result
survives ``save_pretrained`` -> ``from_pretrained`` with identical logits.

Which Linears ``low_rank`` may touch (names relative to ``CognateForCausalLM``): a module is a
candidate when the last part of its name is in ``targets`` and it is a bias-free ``nn.Linear``.
With the default targets these are the attention q/k/v/o_proj and the MLP gate/up/down_proj of
every plain block and of the ACT block (``model.act.block``), and also the Titans memory's
q_proj/k_proj/v_proj/o_proj (``model.memory.*``, hidden <-> memory_dim), which end with target
names and are plain projections, so they are factorised like the others. ``lm_head`` (possibly
tied to the embeddings), ``model.memory.gates`` (3 outputs, biased) and ``model.act.halt``
(1 output, biased) never match, and could not save parameters anyway.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from phases.cognate.modeling import CognateMLP, CognateRMSNorm, LowRankLinear

__all__ = ["DEFAULT_TARGETS", "block_influence", "drop_layers", "low_rank", "param_count", "prune_ffn"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def param_count(model: nn.Module) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _check_batches(batches: torch.Tensor) -> None:
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.dtype not in (torch.int64, torch.int32):
        shape = tuple(batches.shape) if isinstance(batches, torch.Tensor) else type(batches).__name__
        raise ValueError(f"batches must be an (N, T) int64 tensor of token ids, got {shape}")


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


@torch.no_grad()
def _run(model: nn.Module, batches: torch.Tensor) -> None:
    """One no-grad eval forward (the model's train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        model(input_ids=batches.to(next(model.parameters()).device))
    finally:
        model.train(was_training)


def block_influence(model: nn.Module, batches: torch.Tensor) -> list[float]:
    """ShortGPT Block Influence of every plain block of ``model.model.layers``.

    Args:
        model: a ``CognateForCausalLM``.
        batches: (N, T) int64 token ids; one no-grad forward in eval mode.
    Returns:
        BI_i = 1 - mean over the N * T tokens of cos(block input, block output), one per plain block
        (the ACT block is not included). Higher = more important.
    Raises:
        ValueError: ``batches`` is not an (N, T) integer tensor.
    """
    _check_batches(batches)
    scores: dict[int, float] = {}

    def hook(index: int):
        def record(module, args, output):
            cos = F.cosine_similarity(args[0].double(), output.double(), dim=-1)  # (N, T)
            scores[index] = 1.0 - cos.mean().item()
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        _run(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return [scores[i] for i in range(len(model.model.layers))]


def _renumber_ranks(ranks: dict[str, int] | None, new_index: dict[int, int]) -> dict[str, int] | None:
    """``linear_ranks`` after dropping blocks: keys of kept blocks renumbered, dropped ones removed."""
    if not ranks:
        return ranks
    out = {}
    for name, rank in ranks.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            out[name] = rank
        elif int(match.group(1)) in new_index:
            out[f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = rank
    return out or None


def _update_bitnet(config, *, index: dict[int, int] | None = None, removed: set[str] = frozenset()) -> None:
    """Keep phase 4's ``config.bitnet`` (its ternary layers and their thresholds) true after a
    transform: blocks renumbered by ``index`` (dropped ones gone), ``removed`` layers (factorised:
    no longer ternary) taken out."""
    info = getattr(config, "bitnet", None)
    if not info or not info.get("layers"):
        return
    layers = {n: 0 for n in info["layers"] if n not in removed}
    thresholds = {n: t for n, t in (info.get("thresholds") or {}).items() if n not in removed}
    if index is not None:
        layers = _renumber_ranks(layers, index) or {}
        thresholds = _renumber_ranks(thresholds, index) or {}
    config.bitnet = {**info, "layers": list(layers), **({"thresholds": thresholds} if "thresholds" in info else {})}


def drop_layers(model: nn.Module, n: int, batches: torch.Tensor) -> tuple[nn.Module, list[int]]:
    """Removes the ``n`` plain blocks with the lowest Block Influence (ShortGPT).

    The ACT (pondered) block and the memory are never removed. Ties go to the later block.

    Args:
        model: a ``CognateForCausalLM`` (not modified).
        n: how many plain blocks to remove, 0 <= n <= len(model.model.layers).
        batches: (N, T) int64 calibration token ids.
    Returns:
        (new model in eval mode with ``config.num_hidden_layers`` reduced by n, dropped indices ascending).
    Raises:
        ValueError: ``n`` out of range (the message names n and the number of plain blocks); bad ``batches``.
    """
    count = len(model.model.layers)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= count:
        raise ValueError(f"n must be an int in [0, {count}] (the number of plain blocks), got {n!r}")
    _check_batches(batches)
    new = _copy(model)
    if n == 0:
        return new, []
    scores = block_influence(new, batches)
    order = sorted(range(count), key=lambda i: (scores[i], -i))  # lowest BI first; ties: later block
    dropped = sorted(order[:n])
    kept = [i for i in range(count) if i not in dropped]
    new.model.layers = nn.ModuleList(new.model.layers[i] for i in kept)
    new.config.num_hidden_layers -= n
    index = {old: pos for pos, old in enumerate(kept)}
    new.config.linear_ranks = _renumber_ranks(getattr(new.config, "linear_ranks", None), index)
    _update_bitnet(new.config, index=index)
    return new, dropped


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of a Linear or the product of a LowRankLinear's factors."""
    if isinstance(module, LowRankLinear):
        return module.up.weight @ module.down.weight
    return module.weight


def _keep_rows(module: nn.Module, idx: torch.Tensor) -> None:
    """Keeps output features ``idx`` of a bias-free Linear or LowRankLinear (in place)."""
    linear = module.up if isinstance(module, LowRankLinear) else module
    linear.weight = nn.Parameter(linear.weight[idx].contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features = module.out_features = len(idx)


def _keep_cols(module: nn.Module, idx: torch.Tensor) -> None:
    """Keeps input features ``idx`` of a bias-free Linear or LowRankLinear (in place)."""
    linear = module.down if isinstance(module, LowRankLinear) else module
    linear.weight = nn.Parameter(linear.weight[:, idx].contiguous(), requires_grad=linear.weight.requires_grad)
    linear.in_features = module.in_features = len(idx)


def prune_ffn(model: nn.Module, keep: float, batches: torch.Tensor) -> tuple[nn.Module, dict]:
    """Structured width pruning of every MLP (plain blocks and the ACT block) to one width.

    Neuron j of an MLP scores mean_t |h_j| * ||W_down[:, j]||, with h the input of ``down_proj``
    (after the intermediate ``sub_norm`` when present) over the tokens of one no-grad forward of
    ``batches``; each MLP keeps its top ``w = max(1, round(keep * intermediate_size))`` neurons in
    their original order (ties: the lower index). With ``sub_norm`` the RMSNorm's statistics
    change with the width, so even zero-score neurons are not removed exactly.

    Args:
        model: a ``CognateForCausalLM`` (not modified).
        keep: fraction of the intermediate width kept, in (0, 1]; 1 keeps everything.
        batches: (N, T) int64 calibration token ids.
    Returns:
        (new model with ``config.intermediate_size = w``, ``{"width": w, "kept": {mlp name: [indices]}}``).
    Raises:
        ValueError: ``keep`` outside (0, 1]; bad ``batches``.
    """
    _check_fraction("keep", keep)
    _check_batches(batches)
    new = _copy(model)
    inter = new.config.intermediate_size
    width = max(1, round(keep * inter))
    mlps = {name: m for name, m in new.named_modules() if isinstance(m, CognateMLP)}
    if width >= inter:
        return new, {"width": inter, "kept": {name: list(range(inter)) for name in mlps}}
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def hook(name: str):
        def record(module, args):
            h = args[0].detach().double().abs()  # (N, T, I)
            sums[name] = sums.get(name, 0) + h.reshape(-1, h.shape[-1]).sum(0)
            tokens[name] = tokens.get(name, 0) + h.numel() // h.shape[-1]
        return record

    handles = [m.down_proj.register_forward_pre_hook(hook(name)) for name, m in mlps.items()]
    try:
        _run(new, batches)
    finally:
        for handle in handles:
            handle.remove()
    kept = {}
    with torch.no_grad():
        for name, mlp in mlps.items():
            norms = _dense_weight(mlp.down_proj).double().norm(dim=0)  # (I,)
            score = sums[name].to(norms.device) / tokens[name] * norms
            top = torch.sort(score, descending=True, stable=True).indices[:width]
            idx = top.sort().values.to(norms.device)
            _keep_rows(mlp.gate_proj, idx)
            _keep_rows(mlp.up_proj, idx)
            _keep_cols(mlp.down_proj, idx)
            if isinstance(mlp.sub_norm, CognateRMSNorm):
                weight = mlp.sub_norm.weight
                mlp.sub_norm.weight = nn.Parameter(weight[idx].contiguous(), requires_grad=weight.requires_grad)
            kept[name] = idx.tolist()
    new.config.intermediate_size = width
    return new, {"width": width, "kept": kept}


def low_rank(model: nn.Module, fraction: float, *,
             targets: Iterable[str] = DEFAULT_TARGETS) -> tuple[nn.Module, dict[str, int]]:
    """Truncated-SVD factorisation of the target Linears where it saves parameters.

    A bias-free ``nn.Linear`` whose name's last part is in ``targets`` (see the module docstring for
    which modules these are) gets rank ``r = max(1, round(fraction * min(in, out)))`` and is
    factorised only when ``r * (in + out) < in * out``: W ~ U_r S_r V_r^T (SVD in float64),
    ``up.weight = U_r sqrt(S_r)``, ``down.weight = sqrt(S_r) V_r^T``. Already factorised modules are
    left as they are; ``config.linear_ranks`` gains the new names.

    Args:
        model: a ``CognateForCausalLM`` (not modified).
        fraction: rank as a fraction of min(in, out), in (0, 1]; 1 never saves, so factorises nothing.
        targets: last name parts of the Linears to consider (non-empty).
    Returns:
        (new model, {qualified name: rank} of the Linears factorised by this call; empty when none saved).
    Raises:
        ValueError: ``fraction`` outside (0, 1]; ``targets`` empty or not strings.
    """
    _check_fraction("fraction", fraction)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty sequence of module names, got {targets!r}")
    new = _copy(model)
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, module in list(new.named_modules()):
            parent_name, _, child = name.rpartition(".")
            if type(module) is not nn.Linear or module.bias is not None or child not in targets or name == "lm_head":
                continue
            n_in, n_out = module.in_features, module.out_features
            rank = max(1, round(fraction * min(n_in, n_out)))
            if rank * (n_in + n_out) >= n_in * n_out:
                continue
            weight = module.weight
            u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
            root = s[:rank].sqrt()
            with torch.device("meta"):  # no init (and no RNG use): the factors are assigned below
                low = LowRankLinear(n_in, n_out, rank)
            low.up.weight = nn.Parameter((u[:, :rank] * root).to(weight.dtype).contiguous(),
                                         requires_grad=weight.requires_grad)  # (out, r)
            low.down.weight = nn.Parameter((root[:, None] * vh[:rank]).to(weight.dtype).contiguous(),
                                           requires_grad=weight.requires_grad)  # (r, in)
            if getattr(module, "residual_out", False):
                low.up.residual_out = True
            setattr(new.get_submodule(parent_name) if parent_name else new, child, low)
            ranks[name] = rank
    if ranks:
        new.config.linear_ranks = {**(getattr(new.config, "linear_ranks", None) or {}), **ranks}
        _update_bitnet(new.config, removed=set(ranks))
    return new, ranks

