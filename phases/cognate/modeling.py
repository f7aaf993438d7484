"""The Cognate decoder family as a Hugging Face model (model_type ``"cognate"``).

A pre-norm decoder-only transformer (RMSNorm, rotary positions of Su et al. 2021, causal
scaled-dot-product attention, SwiGLU MLP of Shazeer 2020) with the two mechanisms of the
reference's Phase 1 (TinyTitan):

- Adaptive Computation Time (Graves 2016, see ``act.py``): the last of the ``n_layers``
  blocks is applied repeatedly per token with a halting unit; ``act_threshold`` = 1 - eps
  per variant; step caps ``act_max_steps_train`` in training, ``act_max_steps_infer`` in eval.
- Titans-style long-term memory (Behrouz et al. 2024/2025, see ``memory.py``) read into the
  residual stream before the pondering block when ``memory_enabled``.

All three variants share parameter names and shapes (the memory and halting unit exist in
every one), so EvoMerge can merge them. Importing ``phases.cognate`` registers the classes
with ``AutoConfig`` / ``AutoModelForCausalLM``; after that ``from_pretrained(dir)`` and
``generate()`` work on every Cognate output directory without ``trust_remote_code``.
Generation recomputes the whole prefix each step (no KV cache): per-token pondering and the
chunked memory make cached states step-dependent, and tiny models do not need the speed.

``sub_norm`` adds BitNet's SubLN (an RMSNorm before ``o_proj`` and before ``down_proj``); off
in phase 1, turned on by phase 4 (``phases/bitnet``).

``linear_ranks`` (phase 7, ``phases/adas/build.py``) maps qualified Linear names (relative to
``CognateForCausalLM``, e.g. ``"model.layers.0.mlp.up_proj"``) to a rank: each is built as a
``LowRankLinear`` (``up(down(x))``, the truncated-SVD factors), so factorised models load with
``from_pretrained`` like any other.

Parallel thoughts (Quiet-STaR, ``phases/quietstar/mask.py``): ``attention_mask`` may also be a
boolean (B or 1, 1, T, T) mask (True = may attend), used as-is by every attention, with the
caller's ``position_ids``; ``memory_anchors`` (T,), or (B, T) for a layout per row, then keeps
the memory from leaking across thoughts (only the base prefix writes; a thought reads its
anchor's state, see ``memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .act import ACTPonder
from .memory import TitansMemory, base_length

try:  # transformers >= 5: init helpers that respect already-loaded weights
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

__all__ = ["CognateModelConfig", "CognateModel", "CognateForCausalLM", "CognateCausalLMOutput", "LowRankLinear"]


class CognateModelConfig(PretrainedConfig):
    """HF config of a Cognate model. Field names follow HF conventions (hidden_size, ...).

    Raises:
        ValueError: on an inconsistent shape (e.g. hidden_size not divisible by heads).
    """

    model_type = "cognate"

    def __init__(self, vocab_size: int = 258, hidden_size: int = 32, intermediate_size: int = 64,
                 num_hidden_layers: int = 2, num_attention_heads: int = 2, max_position_embeddings: int = 256,
                 rms_norm_eps: float = 1e-5, rotary_base: float = 10000.0, initializer_range: float = 0.02,
                 tie_word_embeddings: bool = False, act_threshold: float = 0.95, act_max_steps_train: int = 8,
                 act_max_steps_infer: int = 2, act_halt_bias: float = 1.0, memory_enabled: bool = False,
                 memory_slots: int = 64, memory_dim: int | None = None, memory_chunk_size: int = 16,
                 memory_max_lr: float = 1.0, variant: str = "base", use_cache: bool = False,
                 sub_norm: bool = False, bos_token_id: int | None = 256, eos_token_id: int | None = 256,
                 pad_token_id: int | None = 257, linear_ranks: dict[str, int] | None = None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rotary_base = rotary_base
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.act_threshold = act_threshold  # 1 - eps of ACT
        self.act_max_steps_train = act_max_steps_train
        self.act_max_steps_infer = act_max_steps_infer
        self.act_halt_bias = act_halt_bias
        self.memory_enabled = memory_enabled
        self.memory_slots = memory_slots
        self.memory_dim = memory_dim if memory_dim is not None else hidden_size
        self.memory_chunk_size = memory_chunk_size
        self.memory_max_lr = memory_max_lr
        self.variant = variant
        # SubLN (BitNet b1.58, microsoft/BitNet gpu/model.py): an RMSNorm before the attention's
        # output projection and before the MLP's down projection. Phase 4 turns it on.
        self.sub_norm = sub_norm
        self.use_cache = use_cache  # there is no KV cache (see the module docstring)
        # Low-rank factorised Linears (phase 7): qualified name -> rank, built as LowRankLinear.
        self.linear_ranks = dict(linear_ranks) if linear_ranks else None
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        head_dim, rem = divmod(hidden_size, max(num_attention_heads, 1))
        if num_attention_heads < 1 or rem or head_dim % 2:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                             f"({num_attention_heads}) into an even head dimension (rotary)")
        if not 0.0 < act_threshold <= 1.0:
            raise ValueError(f"act_threshold must be in (0, 1], got {act_threshold}")
        if not 1 <= act_max_steps_infer <= act_max_steps_train:
            raise ValueError("need 1 <= act_max_steps_infer <= act_max_steps_train, got "
                             f"{act_max_steps_infer} and {act_max_steps_train}")
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        for name, rank in (self.linear_ranks or {}).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"linear_ranks[{name!r}] must be an int >= 1, got {rank!r}")
        super().__init__(**kwargs)


@dataclass
class CognateCausalLMOutput(ModelOutput):
    """Causal-LM output plus ACT statistics.

    loss: mean next-token cross-entropy when ``labels`` are given (no ponder term).
    logits: (B, T, V).
    ponder_cost: mean of N + R over real tokens (differentiable; the training loss adds
        ``ponder_cost * tau``).
    ponder_steps: mean N over real tokens (no gradient).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ponder_cost: torch.Tensor | None = None
    ponder_steps: torch.Tensor | None = None


class CognateRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin tables (B, 1, T, D) for positions (B, T); computed, not stored (no buffers)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, T, D/2)
    emb = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LowRankLinear(nn.Module):
    """A bias-free Linear factorised as ``up(down(x))``: ``down`` in -> rank, ``up`` rank -> out.

    Holds no parameters of its own, so ``_init_weights`` initialises the two factors as Linears.
    """

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class CognateAttention(nn.Module):
    def __init__(self, cfg: CognateModelConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj.residual_out = True  # marks the scaled init (HF initialises leaf modules)
        self.sub_norm = CognateRMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sub_norm else nn.Identity()

    def forward(self, x, cos, sin, attn_mask):
        bsz, seq, width = x.shape
        q, k, v = (p(x).view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        return self.o_proj(self.sub_norm(out.transpose(1, 2).reshape(bsz, seq, width)))  # (B, T, C)


class CognateMLP(nn.Module):
    def __init__(self, cfg: CognateModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.down_proj.residual_out = True
        self.sub_norm = CognateRMSNorm(cfg.intermediate_size, cfg.rms_norm_eps) if cfg.sub_norm else nn.Identity()

    def forward(self, x):
        return self.down_proj(self.sub_norm(F.silu(self.gate_proj(x)) * self.up_proj(x)))  # SwiGLU


class CognateBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: CognateModelConfig):
        super().__init__()
        self.input_norm = CognateRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = CognateAttention(cfg)
        self.post_attn_norm = CognateRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = CognateMLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None):
        x = x + self.attn(self.input_norm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attn_norm(x))


class CognatePreTrainedModel(PreTrainedModel):
    config_class = CognateModelConfig
    base_model_prefix = "model"
    _no_split_modules = ["CognateBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # HF calls this per module, children before parents, and skips modules without
        # parameters of their own; so rules sit on the modules that own the parameters.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2's scaled init of residual-branch outputs keeps the stream's variance in check.
            scale = (2 * self.config.num_hidden_layers) ** -0.5 if getattr(module, "residual_out", False) else 1.0
            _init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, CognateRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, ACTPonder):
            _init.normal_(module.step_embed, mean=0.0, std=std)
            _init.zeros_(module.halt.weight)  # every token starts at h = sigmoid(halt_bias)
            _init.constant_(module.halt.bias, float(self.config.act_halt_bias))
        elif isinstance(module, TitansMemory):
            _init.ones_(module.norm_weight)
            _init.normal_(module.slot_keys, mean=0.0, std=1.0)
            _init.zeros_(module.o_proj.weight)
            # Gate biases: momentum eta ~ 0.88, step theta ~ 0.5 * max_lr, forgetting alpha ~ 0.02.
            _init.copy_(module.gates.bias, torch.tensor([2.0, 0.0, -4.0]))


class CognateModel(CognatePreTrainedModel):
    """Embeddings, n_layers - 1 plain blocks, the memory, the pondered block, final norm."""

    def __init__(self, config: CognateModelConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CognateBlock(config) for _ in range(config.num_hidden_layers - 1))
        self.memory = TitansMemory(config.hidden_size, config.memory_slots, config.memory_dim,
                                   config.memory_chunk_size, config.memory_max_lr, config.rms_norm_eps)
        self.act = ACTPonder(CognateBlock(config), config.hidden_size, config.act_max_steps_train,
                             config.act_halt_bias)
        self.norm = CognateRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                memory_anchors=None, **kwargs):
        """Returns (hidden (B, T, C), ponder cost (B, T), ponder steps (B, T)).

        ``attention_mask`` is None, a (B, T) padding mask, or a bool (B or 1, 1, T, T) mask used
        as-is; ``memory_anchors`` (T,) or (B, T) is passed to the memory (see ``CognateForCausalLM``).

        Raises:
            ValueError: a mask of another shape or a non-bool 4-D mask; bad ``memory_anchors``;
                ``memory_anchors`` with a (B, T) padding mask.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        bsz, seq = x.shape[:2]
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(f"attention_mask must be (B, T) or (B, 1, T, T), got shape {tuple(attention_mask.shape)}")
        square = attention_mask is not None and attention_mask.dim() == 4  # used as-is
        if square and (attention_mask.dtype != torch.bool or attention_mask.shape[1:] != (1, seq, seq)
                       or attention_mask.shape[0] not in (1, bsz)):
            raise ValueError(f"a 4-D attention_mask must be bool of shape ({bsz} or 1, 1, {seq}, {seq}), "
                             f"got {attention_mask.dtype} of shape {tuple(attention_mask.shape)}")
        if memory_anchors is not None:
            if attention_mask is not None and not square:
                raise ValueError("memory_anchors with a (B, T) padding mask is not supported; pass a 4-D "
                                 "(B, 1, T, T) attention mask (e.g. phases.quietstar.mask.thought_attention_mask)")
            if not self.config.memory_enabled:  # else the memory validates them
                base_length(memory_anchors, seq, batch=bsz)
        if not square and attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing masked: take the fast causal path
        if position_ids is None:
            position_ids = (torch.arange(seq, device=x.device).expand(bsz, seq) if attention_mask is None or square
                            else (attention_mask.long().cumsum(-1) - 1).clamp_min(0))  # left padding
        cos, sin = rotary_tables(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                 self.config.rotary_base, x.dtype)
        attn_mask = attention_mask if square else None
        if attention_mask is not None and not square:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            eye = torch.eye(seq, dtype=torch.bool, device=x.device)  # a pad query still sees itself
            attn_mask = (causal & attention_mask.bool()[:, None, None, :]) | eye  # (B, 1, T, T)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
        if self.config.memory_enabled:
            x = x + self.memory(x, None if square else attention_mask, anchors=memory_anchors)
        cap = self.config.act_max_steps_train if self.training else self.config.act_max_steps_infer
        x, rho, steps = self.act(x, self.config.act_threshold, cap,
                                 block_kwargs={"cos": cos, "sin": sin, "attn_mask": attn_mask})
        return self.norm(x), rho, steps


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    """Cognate with an LM head; ``.generate()`` works (full-prefix recompute, no cache)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CognateModelConfig):
        super().__init__(config)
        self.model = CognateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._factorise(config.linear_ranks or {})
        self.post_init()

    def _factorise(self, ranks: dict[str, int]) -> None:
        """Replaces each named Linear by a LowRankLinear of its rank (before init and loading).

        Raises:
            ValueError: a name that is not a module, not a bias-free Linear, or the tied lm_head.
        """
        for name, rank in ranks.items():
            try:
                module = self.get_submodule(name)
            except AttributeError:
                raise ValueError(f"linear_ranks names {name!r}, which is not a module of CognateForCausalLM") from None
            if type(module) is not nn.Linear or module.bias is not None:
                raise ValueError(f"linear_ranks names {name!r}, a {type(module).__name__} "
                                 f"(only bias-free nn.Linear modules can be factorised)")
            if name == "lm_head" and self.config.tie_word_embeddings:
                raise ValueError("linear_ranks names 'lm_head', which is tied to the input embeddings")
            low = LowRankLinear(module.in_features, module.out_features, rank)
            if getattr(module, "residual_out", False):
                low.up.residual_out = True  # the scaled init goes to the factor writing the residual
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, low)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, return_dict=None, memory_anchors=None, **kwargs) -> CognateCausalLMOutput:
        """Causal LM forward. Cache arguments from ``generate`` are accepted and ignored.

        Args:
            input_ids: (B, T) token ids (or ``inputs_embeds`` (B, T, C)).
            attention_mask: optional (B, T), 1 = token, 0 = padding (left padding supported);
                or a bool (B or 1, 1, T, T) mask, True = may attend, used as-is by every
                attention (e.g. ``phases.quietstar.mask.thought_attention_mask``); the ponder
                statistics then average over all T tokens.
            position_ids: optional (B, T); by default derived from a (B, T) ``attention_mask``,
                else 0..T-1 (pass ``thought_position_ids`` with a thought mask).
            labels: optional (B, T); the loss is the HF-standard shifted cross-entropy
                (-100 ignored).
            memory_anchors: optional (T,) or (B, T) long, the base position of every token:
                0..n_base-1 for the base prefix, then an anchor in [0, n_base) for each thought
                token (``thought_layout``'s anchors). (T,) serves every row; (B, T) gives each
                row its own layout, with the same n_base in every row. Only the base prefix
                writes the memory; a thought reads the state its anchor reads. Not allowed with
                a (B, T) mask.
        Returns:
            CognateCausalLMOutput.
        Raises:
            ValueError: a bad ``attention_mask`` shape or 4-D dtype, or bad ``memory_anchors``
                (see ``memory.base_length``; (B, T) anchors need B rows).
        """
        hidden, rho, steps = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, inputs_embeds=inputs_embeds,
                                        memory_anchors=memory_anchors)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if attention_mask is None or attention_mask.dim() == 4:
            ponder_cost, ponder_steps = rho.mean(), steps.float().mean()
        else:
            w = attention_mask.to(rho.dtype)
            ponder_cost = (rho * w).sum() / w.sum().clamp_min(1.0)
            ponder_steps = (steps.to(rho.dtype) * w).sum() / w.sum().clamp_min(1.0)
        out = CognateCausalLMOutput(loss=loss, logits=logits, ponder_cost=ponder_cost,
                                    ponder_steps=ponder_steps.detach())
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No KV cache: always feed the whole prefix (and drop any cache generate created).
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs


# The Auto classes learn model_type "cognate" when this module loads (exist_ok: idempotent).
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402 - registration follows the classes

AutoConfig.register("cognate", CognateModelConfig, exist_ok=True)
AutoModelForCausalLM.register(CognateModelConfig, CognateForCausalLM, exist_ok=True)
