"""Quiet-STaR over a causal LM: thought tokens, the rollout, the training loss, inference.

``ThoughtModel`` wraps any Hugging Face causal LM whose attention takes a custom 4-D mask (the
Cognate family, Llama, GPT-2 and most others with SDPA or eager attention) with what Quiet-STaR
adds: trainable start/end-of-thought embeddings, the mixing head, and the parallel thought
rollout. The LM itself is unchanged apart from two new vocabulary rows (``add_thought_tokens``),
so a saved thought model is also a plain HF model that runs without thoughts.

One training step (``ThoughtModel.loss``):

1. Choose the chains: N thoughts at every position with n_true true tokens after it (or, with
   ``injection: hard``, at the positions where the base model's loss is highest). The N
   thoughts of a position are separate chains with the same anchor (``mask.py``), so the base
   tokens are computed once, not N times.
2. Sample the thoughts without gradient, one forward per thought token over the base tokens and
   every chain so far (no KV cache: the Cognate models have none): start token, then
   ``thought_length`` tokens by temperature and nucleus sampling with the delimiters masked.
3. One forward with gradient over [base | start, thought, end, the next n_true - 1 true tokens]
   of every chain. It gives the base model's predictions, log pi of every thought token, and the
   hidden states after the thought that, mixed with the base hidden states by the mixing head,
   predict the n_true true tokens (extended teacher forcing).
4. Rewards, mean-over-thoughts baseline, REINFORCE and the total loss (``reinforce.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coordinator.errors import ArtifactError
from phases.quietstar.coherence import coherence_scores
from phases.quietstar.config import QuietStarConfig
from phases.quietstar.mask import chain_index, thought_attention_mask, thought_layout, thought_position_ids
from phases.quietstar.mixing import MixingHead
from phases.quietstar.reinforce import baseline_subtract, quietstar_loss, talk_rewards, thought_logprob
from phases.quietstar.sampling import mask_thought_delimiters, sample_thought_tokens

__all__ = ["THOUGHT_FILE", "THOUGHT_META", "Rollout", "ThoughtModel", "add_thought_tokens", "load_thought_model",
           "save_thought_model"]

# In a sub-folder, so that tools reading every top-level *.safetensors of an HF dir see only the LM.
THOUGHT_FILE = "quietstar/thoughts.safetensors"  # mixing head and delimiter embeddings
THOUGHT_META = "quietstar/thoughts.json"
_FORMAT = 1


def add_thought_tokens(lm: nn.Module, tokenizer: Any, cfg: QuietStarConfig) -> tuple[int, int]:
    """Add the start/end-of-thought tokens to an HF tokenizer and the model's vocabulary.

    Both new input-embedding rows start as the mean embedding of ``cfg.delimiter_init``'s tokens
    (the reference: "---"); both new output rows as the mean output row, so that neither token
    is favoured. Deterministic (HF's own resizing samples new rows at random). A tokenizer that
    already has both tokens is left as is.

    Args:
        lm: an HF causal LM (``get_input_embeddings``, ``resize_token_embeddings``).
        tokenizer: its HF tokenizer (``add_special_tokens``, ``convert_tokens_to_ids``).
        cfg: names the tokens and the initialising text.
    Returns:
        ``(start_id, end_id)``.
    Raises:
        ValueError: ``cfg.delimiter_init`` encodes to no token.
    """
    vocab = tokenizer.get_vocab()
    if cfg.start_token in vocab and cfg.end_token in vocab:
        return vocab[cfg.start_token], vocab[cfg.end_token]
    init_ids = tokenizer.encode(cfg.delimiter_init, add_special_tokens=False)
    if not init_ids:
        raise ValueError(f"delimiter_init {cfg.delimiter_init!r} encodes to no token")
    tokenizer.add_special_tokens({"additional_special_tokens": [cfg.start_token, cfg.end_token]})
    start_id, end_id = tokenizer.convert_tokens_to_ids([cfg.start_token, cfg.end_token])
    old = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(max(len(tokenizer), old), mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[[start_id, end_id]] = emb[init_ids].mean(dim=0)
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[[start_id, end_id]] = out.weight[:old].mean(dim=0)
    return int(start_id), int(end_id)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax over the last dim, in float32: (...)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


@dataclass
class Rollout:
    """Everything one training forward produced. B rows, N thoughts, P positions, K true tokens,
    m thought tokens per thought."""

    loss: torch.Tensor  # 0-d, with gradient
    parts: dict[str, torch.Tensor]  # detached: base_nll, talk_nll, policy_loss, reward_mean
    anchors: torch.Tensor  # (B, P) the positions with thoughts
    thoughts: torch.Tensor  # (B, N, P, m) sampled tokens
    rewards: torch.Tensor  # (B, N, P) log-likelihood gain of the true tokens, before the baseline
    keep: torch.Tensor  # (B, N, P) bool: passed the coherence filter
    scores: dict[str, torch.Tensor]  # (B, N, P) semantic, relevance, fluency, coherence
    mixing_weight: torch.Tensor  # (B, N, P, K) the mixing head's w
    talk_entropy: torch.Tensor  # (B, N, P) entropy of the mixed prediction of the first true token


class ThoughtModel(nn.Module):
    """An HF causal LM with Quiet-STaR's start/end embeddings, mixing head and rollout."""

    def __init__(self, lm: nn.Module, cfg: QuietStarConfig, *, start_id: int, end_id: int, init_seed: int = 0):
        """Wrap ``lm`` (whose vocabulary already holds ``start_id`` and ``end_id``, see
        ``add_thought_tokens``); the delimiter embeddings start as those rows of its embedding;
        the mixing head's hidden layers are initialised from ``init_seed`` (the global RNG is
        left untouched), so the same seed gives the same model in any process.

        Raises:
            ValueError: an id outside the vocabulary, or an LM without a backbone/output head.
        """
        super().__init__()
        if not all(hasattr(lm, a) for a in ("get_input_embeddings", "get_output_embeddings", "base_model")) \
                or lm.get_output_embeddings() is None or lm.base_model is lm:
            raise ValueError(f"{type(lm).__name__} has no separate backbone and output head; Quiet-STaR needs an "
                             "HF causal LM (base_model, get_input_embeddings, get_output_embeddings)")
        self.lm = lm
        self.cfg = cfg
        emb = lm.get_input_embeddings().weight
        vocab, hidden = emb.shape
        for name, tok in (("start_id", start_id), ("end_id", end_id)):
            if not 0 <= tok < vocab:
                raise ValueError(f"{name} {tok} is outside the model's vocabulary of {vocab}")
        self.start_id, self.end_id = int(start_id), int(end_id)
        self.scale = cfg.embedding_scale
        self.start_embedding = nn.Parameter(emb[start_id].detach().clone() / self.scale)
        self.end_embedding = nn.Parameter(emb[end_id].detach().clone() / self.scale)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.mixing = MixingHead(hidden, cfg.mixing_hidden).to(device=emb.device, dtype=emb.dtype)
        backbone = lm.base_model
        self._memory_anchors = "memory_anchors" in inspect.signature(backbone.forward).parameters
        # The Cognate family takes a bool mask; other HF models take an additive float mask,
        # which both their SDPA and eager attention add to the scores.
        self._bool_mask = getattr(lm.config, "model_type", None) == "cognate"

    # -- low level -------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _delimiter(self, which: str, shape: tuple[int, ...]) -> torch.Tensor:
        vec = self.start_embedding if which == "start" else self.end_embedding
        return (vec * self.scale).expand(*shape, vec.shape[-1])

    def _hidden(self, embeds: torch.Tensor, seq_len: int, steps: int, anchors: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, d) of [base | ``steps`` tokens of every chain] (``mask.py``)."""
        device = embeds.device
        mask = thought_attention_mask(seq_len, steps, anchors=anchors).to(device)  # (B, 1, T, T)
        if not self._bool_mask:
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask,
                                  "position_ids": thought_position_ids(seq_len, steps, anchors=anchors).to(device)}
        if self._memory_anchors:
            kwargs["memory_anchors"] = thought_layout(seq_len, steps, anchors=anchors)[0].to(device)
        out = self.lm.base_model(**kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden)

    @torch.no_grad()
    def _sample(self, base: torch.Tensor, anchors: torch.Tensor, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``thought_length`` tokens for every chain, one forward per token.

        Args:
            base: (B, L, d) embeddings of the base tokens.
            anchors: (B, C) the chains' positions.
        Returns:
            ``(tokens (B, C, m), embeddings of [start, tokens] (B, (m + 1) * C, d) in chain layout)``.
        """
        seq_len, (bsz, n_chains) = base.shape[1], anchors.shape
        chain = [self._delimiter("start", (bsz, n_chains))]
        tokens = []
        for step in range(1, self.cfg.thought_length + 1):
            hidden = self._hidden(torch.cat([base, *chain], dim=1), seq_len, step, anchors)
            logits = self._logits(hidden[:, -n_chains:])  # (B, C, V): the last token of every chain
            tok = sample_thought_tokens(logits, start_id=self.start_id, end_id=self.end_id, top_p=self.cfg.top_p,
                                        temperature=self.cfg.temperature, generator=generator)
            tokens.append(tok)
            chain.append(self._embed(tok))
        return torch.stack(tokens, dim=-1), torch.cat(chain, dim=1)

    def _anchors(self, input_ids: torch.Tensor, nll_next: torch.Tensor | None) -> torch.Tensor:
        """(B, P): every position with n_true true tokens after it, or the hardest of them."""
        bsz, seq_len = input_ids.shape
        usable = seq_len - self.cfg.n_true  # positions 0 .. L-1-K have K true tokens after them
        if usable < 1:
            raise ValueError(f"sequences of {seq_len} tokens are too short for n_true={self.cfg.n_true} "
                             "true tokens after a thought")
        every = torch.arange(usable, device=input_ids.device).expand(bsz, usable)
        if self.cfg.injection == "all" or nll_next is None:
            return every
        k = max(1, round(self.cfg.hard_fraction * usable))
        hardest = nll_next[:, :usable].topk(k, dim=-1).indices  # (B, P) highest base loss
        return hardest.sort(dim=-1).values

    # -- training --------------------------------------------------------------------------------

    def loss(self, input_ids: torch.Tensor, *, generator: torch.Generator | None = None) -> Rollout:
        """One Quiet-STaR training forward on packed sequences (no padding).

        Args:
            input_ids: (B, L) token ids; every position a thought is anchored at has the next
                n_true tokens inside the sequence.
            generator: seeded generator for the thought sampling (on the ids' device).
        Returns:
            A ``Rollout``; call ``.loss.backward()``.
        Raises:
            ValueError: L <= n_true.
        """
        cfg = self.cfg
        bsz, seq_len = input_ids.shape
        n, k_true, m = cfg.n_thoughts, cfg.n_true, cfg.thought_length
        base = self._embed(input_ids)  # (B, L, d), with gradient
        nll_hint = None
        if cfg.injection == "hard":  # the base model's loss picks the positions
            with torch.no_grad():
                logits = self._logits(self._hidden(base, seq_len, 0, torch.zeros(bsz, 0, dtype=torch.long)))
                nll_hint = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        anchors = self._anchors(input_ids, nll_hint)  # (B, P)
        n_pos = anchors.shape[1]
        chains = anchors.repeat(1, n)  # (B, C): chain c = t * P + p is thought t of position p
        n_chains = chains.shape[1]
        tokens, _ = self._sample(base.detach(), chains, generator)  # (B, C, m)

        # The full chains: start, thought, end, then the true tokens x[a+1] .. x[a+K-1].
        offsets = torch.arange(1, k_true, device=input_ids.device)
        true_in = input_ids.gather(1, (chains[:, None, :] + offsets[None, :, None]).reshape(bsz, -1))  # (B, (K-1)*C)
        embeds = torch.cat([base, self._delimiter("start", (bsz, n_chains)),
                            self._embed(tokens.transpose(1, 2).reshape(bsz, -1)),
                            self._delimiter("end", (bsz, n_chains)), self._embed(true_in)], dim=1)
        steps = m + 1 + k_true
        hidden = self._hidden(embeds, seq_len, steps, chains)  # (B, L + steps * C, d)
        where = chain_index(seq_len, steps, n_chains).to(input_ids.device)  # (steps, C)

        # Base model: next-token loss at every position.
        base_logits = self._logits(hidden[:, :seq_len])  # (B, L, V)
        nll_next = F.cross_entropy(base_logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, L-1)

        # Policy: log pi of thought token j from the chain token before it (start, t1, ..).
        policy_logits = mask_thought_delimiters(self._logits(hidden[:, where[:m].reshape(-1)]), self.start_id,
                                                self.end_id).reshape(bsz, m, n_chains, -1).transpose(1, 2)  # (B, C, m, V)
        logp_pi = thought_logprob(policy_logits, tokens, temperature=cfg.reinforce_temperature)  # (B, C)

        # Talk: the end token and the true tokens after it predict x[a+1] .. x[a+K], mixed with
        # the base hidden state that predicts the same token (at position a+k-1).
        h_talk = hidden[:, where[m + 1:].reshape(-1)].reshape(bsz, k_true, n_chains, -1).transpose(1, 2)  # (B, C, K, d)
        pos = chains[:, :, None] + torch.arange(k_true, device=input_ids.device)  # (B, C, K): a + k - 1
        h_base = hidden[:, :seq_len].gather(1, pos.reshape(bsz, -1, 1).expand(-1, -1, hidden.shape[-1]))
        h_mix, w = self.mixing(h_base.reshape(h_talk.shape), h_talk)  # (B, C, K, d), (B, C, K, 1)
        talk_logits = self._logits(h_mix)  # (B, C, K, V)
        targets = input_ids.gather(1, (pos + 1).reshape(bsz, -1)).reshape(pos.shape)  # x[a+k]
        nll_talk = F.cross_entropy(talk_logits.transpose(1, -1), targets.transpose(1, -1),
                                   reduction="none").transpose(1, -1)  # (B, C, K)
        nll_base_k = nll_next.gather(1, pos.reshape(bsz, -1)).reshape(pos.shape)  # (B, C, K)

        def per_thought(t: torch.Tensor) -> torch.Tensor:  # (B, C, ...) -> (B, N, P, ...)
            return t.reshape(bsz, n, n_pos, *t.shape[2:])

        rewards = talk_rewards(per_thought(nll_base_k).detach(), per_thought(nll_talk).detach())  # (B, N, P)
        advantages = baseline_subtract(rewards)
        with torch.no_grad():
            fluency_logp = torch.log_softmax(policy_logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]
            window = chains[:, :, None] - torch.arange(cfg.context_window - 1, -1, -1, device=input_ids.device)
            scores = coherence_scores(
                self.lm.get_input_embeddings().weight, tokens, fluency_logp,
                input_ids.gather(1, window.clamp_min(0).reshape(bsz, -1)).reshape(window.shape),
                targets, context_valid=window >= 0)
            scores = {key: per_thought(v) for key, v in scores.items()}
            keep = (scores["coherence"] >= cfg.coherence_threshold if cfg.coherence_threshold is not None
                    else torch.ones_like(rewards, dtype=torch.bool))
            entropy = _entropy(talk_logits[:, :, 0])  # (B, C)
        parts = quietstar_loss(nll_next, per_thought(nll_talk), advantages, per_thought(logp_pi), cfg, mask=keep)
        return Rollout(loss=parts.pop("loss"), parts=parts, anchors=anchors, thoughts=per_thought(tokens),
                       rewards=rewards, keep=keep, scores=scores, mixing_weight=per_thought(w[..., 0]).detach(),
                       talk_entropy=per_thought(entropy))

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def think(self, input_ids: torch.Tensor, *, anchors: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token logits with one thought at each of ``anchors`` (no gradient).

        Args:
            input_ids: (B, L) token ids (no padding before real tokens; right padding is harmless
                to the positions before it).
            anchors: (B, P) or (P,) positions that think; None = every position, or, when
                ``injection`` is "hard", the hard_fraction (of the shortest row's real tokens)
                of real (non-pad) positions where the base model's entropy is highest.
            generator: seeded generator for the thought sampling; None = seeded with 0, so
                the same call gives the same logits.
        Returns:
            ``(logits (B, L, V), thoughts (B, P, m), anchors (B, P))``: base logits where no
            thought was taken, mixed logits at the anchors; the delimiters masked everywhere.
        """
        if generator is None:
            generator = torch.Generator(device=input_ids.device).manual_seed(0)
        bsz, seq_len = input_ids.shape
        base = self._embed(input_ids)
        base_h = self._hidden(base, seq_len, 0, torch.zeros(bsz, 0, dtype=torch.long))
        logits = self._logits(base_h)  # (B, L, V)
        if anchors is None:
            anchors = torch.arange(seq_len, device=input_ids.device).expand(bsz, seq_len)
            if self.cfg.injection == "hard":  # no labels here: the base model's entropy ranks difficulty
                entropy = _entropy(logits)  # (B, L)
                pad = getattr(self.lm.config, "pad_token_id", None)
                real = input_ids != pad if pad is not None else torch.ones_like(input_ids, dtype=torch.bool)
                entropy = entropy.masked_fill(~real, float("-inf"))  # never think on padding
                k = max(1, round(self.cfg.hard_fraction * int(real.sum(-1).min().clamp_min(1))))
                anchors = entropy.topk(k, dim=-1).indices.sort(dim=-1).values
        anchors = anchors.to(input_ids.device).long().expand(bsz, -1) if anchors.dim() == 1 else anchors.long()
        tokens, sampled = self._sample(base, anchors, generator)
        n_chains = anchors.shape[1]
        embeds = torch.cat([base, sampled, self._delimiter("end", (bsz, n_chains))], dim=1)
        steps = self.cfg.thought_length + 2
        hidden = self._hidden(embeds, seq_len, steps, anchors)
        h_end = hidden[:, -n_chains:]  # (B, P, d): the end token predicts the next true token
        h_base = base_h.gather(1, anchors[..., None].expand(-1, -1, base_h.shape[-1]))
        h_mix, _ = self.mixing(h_base, h_end)
        logits = logits.scatter(1, anchors[..., None].expand(-1, -1, logits.shape[-1]), self._logits(h_mix))
        return mask_thought_delimiters(logits, self.start_id, self.end_id), tokens, anchors

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Thought-mixed logits at every position, as an object with ``.logits`` (so the
        evaluation helpers that call ``model(input_ids=...).logits`` score the model with
        thoughts). Extra arguments (e.g. an all-ones attention mask) are ignored."""
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.think(input_ids)[0])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int = 20, do_sample: bool = False,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 return_thoughts: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Generate tokens, thinking one thought before each (the thought is not kept in the text).
        For the same model without thoughts, call ``self.lm.generate`` (the plain HF model).

        Args:
            input_ids: (B, L) prompt ids.
            max_new_tokens: at most this many tokens are appended.
            do_sample: sample the next token (temperature and top-p of the config) instead of
                taking the most likely one.
            eos_token_id: stop once every row has produced it (rows that ended get it again).
            generator: seeded generator for thoughts and sampling; None = seeded with 0.
            return_thoughts: also return the thoughts, one (B, m) tensor per generated token.
        Returns:
            ids (B, L + n), or ``(ids, thoughts)`` with ``return_thoughts``.
        Raises:
            ValueError: max_new_tokens < 0.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if generator is None:
            generator = torch.Generator(device=input_ids.device).manual_seed(0)
        ids, thoughts = input_ids, []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            last = torch.tensor([ids.shape[1] - 1], device=ids.device)
            logits, tokens, _ = self.think(ids, anchors=last, generator=generator)
            nxt = logits[:, -1]
            if do_sample:
                tok = sample_thought_tokens(nxt, start_id=self.start_id, end_id=self.end_id, top_p=self.cfg.top_p,
                                            temperature=self.cfg.temperature, generator=generator)
            else:
                tok = nxt.argmax(-1)
            if eos_token_id is not None:
                tok = tok.masked_fill(done, eos_token_id)
                done |= tok == eos_token_id
            ids = torch.cat([ids, tok[:, None]], dim=1)
            thoughts.append(tokens[:, 0])
            if eos_token_id is not None and bool(done.all()):
                break
        return (ids, thoughts) if return_thoughts else ids

    # -- saving ----------------------------------------------------------------------------------

    def export_delimiters(self) -> None:
        """Write the trained start/end embeddings into the LM's embedding rows, so the plain HF
        model (e.g. a later phase, or ``generate`` with the delimiter ids) sees them."""
        with torch.no_grad():
            emb = self.lm.get_input_embeddings().weight
            emb[self.start_id] = self.start_embedding * self.scale
            emb[self.end_id] = self.end_embedding * self.scale

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The tensors Quiet-STaR adds to the LM: mixing head and delimiter embeddings."""
        out = {f"mixing.{k}": v.detach().clone() for k, v in self.mixing.state_dict().items()}
        out["start_embedding"] = self.start_embedding.detach().clone()
        out["end_embedding"] = self.end_embedding.detach().clone()
        return out

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``extra_state``. Raises ValueError naming missing or unexpected keys."""
        want = set(self.extra_state())
        if set(tensors) != want:
            raise ValueError(f"quietstar tensors: missing {sorted(want - set(tensors))}, "
                             f"unexpected {sorted(set(tensors) - want)}")
        self.mixing.load_state_dict({k[len("mixing."):]: v for k, v in tensors.items() if k.startswith("mixing.")})
        with torch.no_grad():
            self.start_embedding.copy_(tensors["start_embedding"])
            self.end_embedding.copy_(tensors["end_embedding"])


def save_thought_model(model: ThoughtModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write an HF model dir (weights, config, tokenizer with the delimiter tokens) plus
    ``quietstar/thoughts.safetensors`` and ``quietstar/thoughts.json``, atomically (temp dir,
    then rename).

    Returns:
        ``out_dir`` as a Path.
    """
    from serialization.checkpoint import atomic_write_json, publish_dir, save_tensors, staging_dir

    tmp = staging_dir(out_dir)
    model.export_delimiters()
    model.lm.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / THOUGHT_FILE).parent.mkdir()
    sha = save_tensors(tmp / THOUGHT_FILE, model.extra_state())
    atomic_write_json(tmp / THOUGHT_META, {"format": _FORMAT, "config": model.cfg.model_dump(mode="json"),
                                           "start_id": model.start_id, "end_id": model.end_id,
                                           "tensors": Path(THOUGHT_FILE).name, "sha256": sha})
    return publish_dir(tmp, out_dir)


def load_thought_model(model_dir: str | Path, *, torch_dtype: torch.dtype | None = None) -> tuple[ThoughtModel, Any]:
    """Load a dir written by ``save_thought_model``: ``(ThoughtModel, tokenizer)``.

    Raises:
        ArtifactError: ``quietstar.json`` or its tensors are missing, altered or malformed.
    """
    import phases.cognate.modeling  # noqa: F401 - registers the Cognate classes with the Auto API
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serialization.checkpoint import load_tensors, read_json

    model_dir = Path(model_dir)
    meta_path = model_dir / THOUGHT_META
    if not meta_path.is_file():
        raise ArtifactError(str(meta_path), f"not a Quiet-STaR model dir (no {THOUGHT_META}); train one with phase 3")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ArtifactError(str(meta_path), f"unsupported format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    try:
        cfg = QuietStarConfig.model_validate(meta["config"])
        start_id, end_id, name, sha = int(meta["start_id"]), int(meta["end_id"]), str(meta["tensors"]), meta["sha256"]
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(str(meta_path), f"malformed: {err}") from None
    tensors = load_tensors(meta_path.parent / Path(name).name, expected_sha256=sha)
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = ThoughtModel(lm, cfg, start_id=start_id, end_id=end_id)
    try:
        model.load_extra_state(tensors)
    except (ValueError, RuntimeError) as err:
        raise ArtifactError(str(meta_path.parent / name), str(err)) from None
    return model, tokenizer
