"""Prompt Baking of a persona (Bhargava, Witkowski, Detkov, Thomson 2024, "Prompt Baking",
arXiv 2409.13697): fine-tune the weights so that the model WITHOUT a prompt behaves like the
model WITH it.

Objective: theta_u = argmin KL(P_theta(. | u) || P_theta_u(.)). The teacher is the frozen model
with the persona prompt u; the student is the model being trained, without u. The KL is
estimated by Monte Carlo over continuations y ~ P_theta(. | u, x) sampled once from the teacher
(x = an optional question prefix), as the per-token full-vocabulary KL
sum_t sum_v P_theta(v | u, x, y<t) [log P_theta(v | u, x, y<t) - log P_theta_u(v | x, y<t)]
on the generated positions only, summed over positions and divided by the number of sequences
(the reference's ``F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True)
.sum() / batch``).

``bake(method="full")`` fine-tunes the whole model; ``method="lora"`` bakes as the paper does, into
LoRA adapters (Hu et al. 2021; the paper: r=32 on q/k/v/o) made with peft, then merged into the
weights, so the result is a plain model with either method. The teacher is a frozen deep copy of
the model taken before training. With BitLinear layers (phase 4's QAT) the adapters are merged into
the latent weights, which are then re-quantized: the merged model is close to, not equal to, the
adapted one (``kl_after`` is measured on the merged model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from phases.training import adamw, derived_seed, epoch_order

if TYPE_CHECKING:
    from phases.data.tokenizer import Tokenizer

__all__ = ["DEFAULT_TRAITS", "BAKE_METHODS", "BakeResult", "bake", "baking_kl", "kl_batch", "persona_prompt",
           "sample_continuations"]

BAKE_METHODS = ("full", "lora")
# LoRA's targets: the attention projections only. Cognate's memory also names its projections q/k/v_proj, so a
# plain suffix list ["q_proj", "k_proj", "v_proj", "o_proj"] would adapt those too; the paper adapts attention.
_LORA_TARGETS = r".*\.attn\.(q_proj|k_proj|v_proj|o_proj)"

# The reference's persona traits, each in [0, 1].
DEFAULT_TRAITS: Mapping[str, float] = {"helpfulness": 0.9, "creativity": 0.7, "precision": 0.8}

# Lower bound of each level word, highest first; below the last bound a trait is "low".
_LEVELS = ((0.85, "very high"), (0.65, "high"), (0.4, "moderate"))


def persona_prompt(traits: Mapping[str, float]) -> str:
    """The persona as a short system prompt, one sentence per trait, traits in name order (a
    mapping's order does not survive every config round trip, and the prompt must not depend on it).

    A value v maps to a word: v >= 0.85 "very high", v >= 0.65 "high", v >= 0.4 "moderate",
    else "low"; the value itself follows in parentheses (rounded to 2 decimals). E.g.
    ``{"helpfulness": 0.9}`` -> ``"You are an assistant. Helpfulness: very high (0.9).\\n"``.

    Args:
        traits: trait name -> value in [0, 1]; underscores in names become spaces.
    Returns:
        The prompt, ending with a newline.
    Raises:
        ValueError: a value that is not a number in [0, 1] (names the trait).
    """
    parts = ["You are an assistant."]
    for name, value in sorted(traits.items()):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"trait {name!r} must be a number in [0, 1], got {value!r}") from None
        if not 0.0 <= v <= 1.0:  # NaN fails too
            raise ValueError(f"trait {name!r} must be in [0, 1], got {value!r}")
        word = next((w for bound, w in _LEVELS if v >= bound), "low")
        label = name.replace("_", " ")
        parts.append(f"{label[:1].upper() + label[1:]}: {word} ({round(v, 2):g}).")
    return " ".join(parts) + "\n"


def _context(bos_id: int | None, prompt_ids: Sequence[int], question_ids: Sequence[int]) -> list[int]:
    return ([] if bos_id is None else [int(bos_id)]) + [int(t) for t in prompt_ids] + [int(t) for t in question_ids]


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompt_ids: Sequence[int], questions_ids: Sequence[Sequence[int]],
                         *, n_samples: int, length: int, temperature: float, seed: int,
                         bos_id: int | None = None) -> list[list[int]]:
    """Sample continuations of ``[bos] + prompt + question`` by temperature sampling, recomputing
    the prefix for every token (no KV cache), in eval mode (restored after).

    Args:
        model: a causal LM, ``model(input_ids=...).logits`` (B, T, V).
        prompt_ids, questions_ids: the prompt u and the question prefixes x (either may be empty).
        n_samples, length: continuations per question, tokens each (an EOS is sampled like any token).
        temperature: softmax temperature (> 0).
        seed: seeds the one ``torch.Generator`` used for all questions, in order.
        bos_id: optional id put before the prompt.
    Returns:
        ``len(questions_ids) * n_samples`` continuations (ids only), question-major: entry
        ``i * n_samples + k`` is sample k of question i.
    Raises:
        ValueError: a non-positive n_samples, length or temperature, or an empty context.
    """
    if n_samples < 1 or length < 1 or not temperature > 0:
        raise ValueError(f"need n_samples >= 1, length >= 1, temperature > 0; got {n_samples}, {length}, {temperature}")
    gen = torch.Generator().manual_seed(int(seed))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for q in questions_ids:
            ctx = _context(bos_id, prompt_ids, q)
            if not ctx:
                raise ValueError("the context (bos + prompt + question) is empty: nothing to condition on")
            ids = torch.tensor([ctx] * n_samples, dtype=torch.long, device=device)  # (n, T)
            for _ in range(length):
                logits = model(input_ids=ids).logits[:, -1, :].float().cpu()  # (n, V)
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)  # (n, 1)
                ids = torch.cat([ids, nxt.to(device)], dim=1)
            out.extend(row[len(ctx):] for row in ids.tolist())
    finally:
        model.train(was_training)
    return out


def kl_batch(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked positions of KL(p_teacher || p_student) over the full vocabulary,
    divided by the number of sequences B; computed in float32.

    Args:
        teacher_logits: (B, T, V).
        student_logits: (B, T, V), aligned with the teacher's position by position.
        mask: (B, T) bool, True where the KL counts (values at other positions are ignored).
    Returns:
        A scalar tensor (differentiable w.r.t. both logits).
    Raises:
        ValueError: mismatched shapes.
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 3:
        raise ValueError(f"teacher and student logits must both be (B, T, V), got {tuple(teacher_logits.shape)} "
                         f"and {tuple(student_logits.shape)}")
    if mask.shape != teacher_logits.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(teacher_logits.shape[:2])}, got {tuple(mask.shape)}")
    m = mask.bool()
    log_t = F.log_softmax(teacher_logits[m].float(), dim=-1)  # (N, V), masked positions only
    log_s = F.log_softmax(student_logits[m].float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum() / teacher_logits.shape[0]


def baking_kl(student: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: Sequence[int],
              examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, bos_id: int | None = None) -> torch.Tensor:
    """The baking loss on a batch: teacher input ``[bos] + prompt + question + continuation``,
    student input ``[bos] + question + continuation``, both padded on the right; the KL counts at
    the positions that predict the continuation tokens (``kl_batch``, mean over examples).

    The teacher runs under no_grad: pass a frozen deep copy of the model (with a full fine-tune
    the student cannot be its own teacher; there is no adapter to disable). Modes are not changed.

    Args:
        student, teacher: the model being baked, and the frozen model that sees the prompt.
        prompt_ids: the prompt u.
        examples: ``(question_ids, continuation_ids)`` pairs; continuations non-empty.
        bos_id: optional id put first in both inputs.
    Returns:
        A scalar tensor, differentiable w.r.t. the student's parameters.
    Raises:
        ValueError: no examples, an empty continuation, or an empty student context.
    """
    if not examples:
        raise ValueError("baking_kl needs at least one example")
    p = len(prompt_ids)
    rows, ctx_lens = [], []
    for q, y in examples:
        ctx = _context(bos_id, [], q)
        if not ctx or not y:
            raise ValueError(f"each example needs a non-empty student context and continuation, got {len(ctx)} "
                             f"context and {len(y)} continuation tokens")
        rows.append(ctx + [int(t) for t in y])
        ctx_lens.append(len(ctx))
    t_len = max(map(len, rows))
    device = next(student.parameters()).device
    ids = torch.zeros(len(rows), t_len, dtype=torch.long)  # (B, T), right-padded with 0
    attn = torch.zeros(len(rows), t_len, dtype=torch.long)
    mask = torch.zeros(len(rows), t_len, dtype=torch.bool)  # positions that predict a continuation token
    for i, (row, c) in enumerate(zip(rows, ctx_lens)):
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        mask[i, c - 1:len(row) - 1] = True
    prefix = torch.tensor(_context(bos_id, prompt_ids, []), dtype=torch.long).expand(len(rows), -1)
    body = ids[:, 0 if bos_id is None else 1:]
    t_ids = torch.cat([prefix, body], dim=1)  # (B, P + T): student position j is teacher position j + P
    t_attn = torch.cat([torch.ones_like(prefix), attn[:, 0 if bos_id is None else 1:]], dim=1)
    with torch.no_grad():
        t_logits = teacher(input_ids=t_ids.to(device), attention_mask=t_attn.to(device)).logits[:, p:]  # (B, T, V)
    s_logits = student(input_ids=ids.to(device), attention_mask=attn.to(device)).logits  # (B, T, V)
    return kl_batch(t_logits, s_logits, mask.to(device))


@dataclass(frozen=True)
class BakeResult:
    """What ``bake`` measured (held-out KL before and after, their ratio, steps, per-step loss) and the baked
    model (not part of the comparison or the repr)."""

    kl_before: float
    kl_after: float
    reduction_factor: float  # kl_before / kl_after (inf when kl_after is 0)
    steps: int
    losses: list[float]
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)


@torch.no_grad()
def _mean_kl(student, teacher, prompt_ids, examples, batch_size: int, bos_id: int | None) -> float:
    total = sum(float(baking_kl(student, teacher, prompt_ids, examples[i:i + batch_size], bos_id=bos_id))
                * len(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size))
    return total / len(examples)


def _train(student: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: Sequence[int],
           train: Sequence[tuple[list[int], list[int]]], steps: int, lr: float, batch_size: int, seed: int,
           bos: int | None) -> list[float]:
    """AdamW steps on the baking KL with the student in eval mode; returns the per-step losses. Frozen parameters
    get no gradient, and AdamW skips them.

    BitLinear layers (phase 4's QAT, ``phases/bitnet/quant.py``) compute in eval mode exactly as the packed model
    does, with no gradient; during the steps they alone run in train mode, their straight-through forward (the
    same ternary weights and 8-bit activations), as QAT trains them. The rest stays in eval mode.
    """
    from phases.bitnet.quant import BitLinear  # plain torch; imported here as only BitNet models need it

    qat = [m for m in student.modules() if isinstance(m, BitLinear)]
    for m in qat:
        m.train()
    opt = adamw(student, lr, weight_decay=0.0)
    losses = []
    try:
        for step in range(steps):
            batch = [train[i] for i in epoch_order(len(train), batch_size, seed, step, "bake-order")]
            loss = baking_kl(student, teacher, prompt_ids, batch, bos_id=bos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for m in qat:
            m.eval()
    return losses


def _with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """``model`` wrapped by peft with rank-``rank`` LoRA adapters on the attention projections (alpha = 2 * rank,
    no dropout); only the adapters train. peft loads here, lazily."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=_LORA_TARGETS, lora_dropout=0.0)
    return get_peft_model(model, config)


def bake(model: torch.nn.Module, tokenizer: Tokenizer, *, traits: Mapping[str, float] = DEFAULT_TRAITS,
         questions: Sequence[str], n_samples: int = 4, length: int = 24, temperature: float = 1.0, steps: int = 50,
         lr: float = 1e-4, batch_size: int = 4, seed: int = 0, val_questions: Sequence[str] | None = None,
         method: str = "full", lora_rank: int = 8) -> BakeResult:
    """Bake ``persona_prompt(traits)`` into ``model`` with AdamW (no weight decay).

    The teacher is ``copy.deepcopy(model)``, frozen. Training data: ``n_samples`` continuations
    per question, sampled once from the teacher before training. Held-out data: a separate set
    of samples (another derived seed) for ``val_questions``, or for the training questions when
    None. Inputs start with ``tokenizer.eos_id`` as BOS. The student is run in eval mode while
    baking (restored after): it should match the teacher in the mode it is used in (Cognate's
    ACT step cap differs between train and eval).

    Args:
        model: causal LM to bake, changed in place (both methods).
        tokenizer: has ``encode(str) -> list[int]`` and ``eos_id``.
        traits, questions, n_samples, length, temperature: the persona and the sampled data.
        steps, lr, batch_size: AdamW steps, learning rate, examples per step.
        seed: seeds torch (the LoRA init), the sampling and the batch order (same seed -> same result).
        val_questions: optional separate held-out questions.
        method: ``"full"`` trains every parameter; ``"lora"`` trains only LoRA adapters of rank ``lora_rank``
            on the attention's q/k/v/o projections and merges them into the weights after training
            (``merge_and_unload``), leaving no peft wrapper; parameters keep their ``requires_grad``.
        lora_rank: the LoRA rank r (alpha = 2r); used by ``"lora"`` only.
    Returns:
        BakeResult with the held-out ``baking_kl`` before and after (mean over examples) and ``model``, the
        baked model: a plain model of the input's class (for both methods the input object itself; use
        ``result.model`` so callers need not know whether a method wrapped it).
    Raises:
        ValueError: an unknown method (lists the valid ones), lora_rank < 1, no questions, steps < 0 or
            batch_size < 1 (and see ``persona_prompt``).
    """
    if method not in BAKE_METHODS:
        raise ValueError(f"unknown bake method {method!r}; valid methods: {', '.join(BAKE_METHODS)}")
    if method == "lora" and lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    if not questions or steps < 0 or batch_size < 1:
        raise ValueError(f"need questions, steps >= 0, batch_size >= 1; got {len(questions)} questions, "
                         f"steps={steps}, batch_size={batch_size}")
    torch.manual_seed(seed)
    prompt_ids, bos = tokenizer.encode(persona_prompt(traits)), tokenizer.eos_id
    teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def data(texts: Sequence[str], tag: str) -> list[tuple[list[int], list[int]]]:
        q_ids = [tokenizer.encode(t) for t in texts]
        ys = sample_continuations(teacher, prompt_ids, q_ids, n_samples=n_samples, length=length,
                                  temperature=temperature, seed=derived_seed(seed, tag), bos_id=bos)
        return [(q_ids[i // n_samples], y) for i, y in enumerate(ys)]

    train, val = data(questions, "bake-train"), data(val_questions or questions, "bake-val")
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}  # peft freezes the base weights
    model.eval()
    try:
        kl_before = _mean_kl(model, teacher, prompt_ids, val, batch_size, bos)
        if method == "lora":
            torch.manual_seed(derived_seed(seed, "bake-lora-init"))
            student = _with_lora(model, lora_rank)  # injects the adapters into model in place
            try:
                losses = _train(student, teacher, prompt_ids, train, steps, lr, batch_size, seed, bos)
            except BaseException:
                student.unload()  # drop the adapters unmerged: leave the model as it was
                raise
            model = student.merge_and_unload()  # the same module object, adapters merged and removed
        else:
            losses = _train(model, teacher, prompt_ids, train, steps, lr, batch_size, seed, bos)
        kl_after = _mean_kl(model, teacher, prompt_ids, val, batch_size, bos)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        model.train(was_training)
    factor = kl_before / kl_after if kl_after > 0 else math.inf
    return BakeResult(kl_before, kl_after, factor, steps, losses, model)
