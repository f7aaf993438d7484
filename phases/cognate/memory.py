"""Titans-style neural long-term memory (Behrouz, Zhong, Mirrokni 2024/2025, "Titans: Learning
to Memorize at Test Time", arXiv 2501.00663), read into the residual stream by cross-attention.

The memory is a two-layer MLP over keys, M(k) = softmax(sqrt(m) cos(k, K_s)) M, whose first layer
(the S "slot" keys K_s, S = memory capacity) is learned by backprop and whose second layer M
(S x m) is written at test time by gradient descent on the associative loss

    l(M; x_t) = 1/2 || M(k_t) - v_t ||^2,   k_t = x_t W_K, v_t = x_t W_V.

Titans' update with surprise, momentum and a forgetting gate, all data dependent:

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)     (surprise: momentary + past)
    M_t = (1 - alpha_t) M_{t-1} + S_t                        (alpha_t: forget / weight decay)

and retrieval y_t = M(q_t), q_t = x_t W_Q, without update. As in Titans' parallel training,
the sequence is cut into chunks: a chunk reads the memory left by the chunks before it, and
writes with one mini-batch gradient (mean over its tokens) and gates averaged over it. A
token never sees itself or later tokens through the memory, so it stays causal. The
gradient of the linear second layer is analytic, so no inner autograd is needed, and the
outer loss still backpropagates through the writes into W_K, W_V, K_s and the gates.

Two equal computations (a test checks they agree): ``_explicit`` keeps M and the momentum
as (B, S, m) tensors, chunk by chunk; ``_dual`` uses that M starts at zero and every write
is a_j^T e_j, so M is a weighted sum of past writes with scalar weights, and reads need
only token-by-token kernels (like linear attention's dual form).

Anchored reads (Quiet-STaR's parallel thoughts, ``phases/quietstar/mask.py``): with
``anchors`` (T,), the first n_base tokens (``anchors[t] == t``) are the base sequence and the
rest are thought tokens, each anchored at a base position ``anchors[t] < n_base``; ``anchors``
(B, T) give every row its own thought layout over the same n_base (a (T,) layout serves every
row). Only the base tokens write, chunk by chunk as above, and they read exactly what they read
without the thoughts; a thought token never writes and reads, with its own query, the state its
anchor reads: M_{c-1}, c the anchor's chunk. So a thought sees nothing of its anchor's chunk or
later chunks, and nothing of other thoughts. ``_explicit`` keeps each chunk's pre-write state
and reads it for the thoughts grouped by chunk; ``_dual`` keeps the coefficients mu of every
pre-write state, so a thought's read is one row of (B_th A^T * mu[chunk(anchor), chunk(u)]) E.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["associative_grad", "surprise", "memory_update", "base_length", "TitansMemory"]


def associative_grad(memory: torch.Tensor, address: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient w.r.t. the memory of the mean over tokens of 1/2 ||a_t M - v_t||^2.

    Args:
        memory: (B, S, m) second-layer weights M.
        address: (B, C, S) first-layer activations a_t (softmax over slots).
        values: (B, C, m) targets v_t.
        mask: optional (B, C) 1 for real tokens, 0 for padding (padding writes nothing).
    Returns:
        (B, S, m): sum_t a_t^T (a_t M - v_t) / (number of real tokens).
    """
    err = address @ memory - values  # (B, C, m)
    if mask is None:
        count = torch.full(err.shape[:1], float(err.shape[1]), dtype=err.dtype, device=err.device)
    else:
        err = err * mask.unsqueeze(-1)
        count = mask.sum(-1).clamp_min(1.0)
    return address.transpose(1, 2) @ err / count.view(-1, 1, 1)


def surprise(memory: torch.Tensor, address: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Momentary surprise per token: || grad l(M; x_t) ||_F = ||a_t|| * ||a_t M - v_t||.

    Args:
        memory: (B, S, m); address: (B, C, S); values: (B, C, m).
    Returns:
        (B, C) non-negative surprise of each token under ``memory``.
    """
    return address.norm(dim=-1) * (address @ memory - values).norm(dim=-1)


def memory_update(memory: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, eta: torch.Tensor,
                  theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Titans write: S' = eta S - theta grad;  M' = (1 - alpha) M + S'.

    Args:
        memory, momentum, grad: (B, S, m).
        eta (momentum decay), theta (step size), alpha (forget gate): broadcastable to
            (B, S, m), typically (B, 1, 1).
    Returns:
        (new memory, new momentum).
    """
    momentum = eta * momentum - theta * grad
    return (1.0 - alpha) * memory + momentum, momentum


def base_length(anchors: torch.Tensor, seq_len: int, batch: int | None = None) -> int:
    """Length n_base of the base prefix of an anchored sequence, after validating ``anchors``.

    Args:
        anchors: (T,) or (B, T) integer tensor; in every row ``anchors[t] == t`` for the base
            tokens 0..n_base-1 (a prefix) and ``anchors[t]`` in [0, n_base) for every later
            (thought) token. All rows share n_base.
        seq_len: T, the length of the sequence the anchors describe.
        batch: optional batch size B that (B, T) anchors must have (not checked for (T,)).
    Returns:
        n_base (>= 1).
    Raises:
        ValueError: ``anchors`` is not a (T,) or (B, T) integer tensor, has another number of
            rows than ``batch``, has rows with different base prefix lengths, or does not have
            that layout.
    """
    if not isinstance(anchors, torch.Tensor) or anchors.is_floating_point() or anchors.is_complex() \
            or anchors.dtype == torch.bool or anchors.shape[-1:] != (seq_len,) or anchors.dim() not in (1, 2) \
            or anchors.numel() == 0:
        kind = (f"{anchors.dtype} tensor of shape {tuple(anchors.shape)}" if isinstance(anchors, torch.Tensor)
                else type(anchors).__name__)
        raise ValueError(f"anchors must be an integer tensor of shape ({seq_len},) or (B, {seq_len}), got a {kind}")
    if batch is not None and anchors.dim() == 2 and anchors.shape[0] != batch:
        raise ValueError(f"anchors of shape {tuple(anchors.shape)} have {anchors.shape[0]} rows, but the batch "
                         f"has {batch}")
    rows = anchors.reshape(-1, seq_len)  # (B, T); one row for (T,)
    is_base = rows == torch.arange(seq_len, device=anchors.device)  # (B, T)
    lengths = is_base.long().cumprod(-1).sum(-1).tolist()  # per row: the leading run of anchors[t] == t
    n_base = lengths[0]
    for row, length in enumerate(lengths):
        if length != n_base:
            raise ValueError(f"every row of anchors must have the same base prefix length; row {row} has "
                             f"{length}, row 0 has {n_base}")
    later = rows[:, n_base:]  # (B, T - n_base)
    in_range = ((later >= 0) & (later < n_base)).all(-1)  # (B,)
    if n_base == 0 or not bool(in_range.all()):
        row = int((~in_range).long().argmax())
        where = f" in row {row}" if anchors.dim() == 2 else ""
        raise ValueError(f"anchors must be 0..n_base-1 (the base tokens) followed by anchors in [0, n_base); "
                         f"got{where} a base prefix of length {n_base} and later anchors {later[row].tolist()[:8]}...")
    return n_base


class TitansMemory(nn.Module):
    """Long-term memory block: normalise, write chunk by chunk, read by cross-attention.

    Args:
        hidden_size: C, the residual width.
        slots: S, memory capacity (hidden units of the memory MLP).
        dim: m, width of keys/values in memory.
        chunk_size: tokens per write (Titans' chunk-wise parallel update).
        max_lr: theta_t = sigmoid(.) * max_lr.
        eps: RMSNorm epsilon.
    """

    def __init__(self, hidden_size: int, slots: int, dim: int, chunk_size: int, max_lr: float, eps: float = 1e-5):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.q_proj = nn.Linear(hidden_size, dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, dim, bias=False)
        self.slot_keys = nn.Parameter(torch.zeros(slots, dim))  # (S, m): the memory MLP's first layer
        # eta, theta, alpha per token from the input (data-dependent gates, as in Titans).
        self.gates = nn.Linear(hidden_size, 3)
        # Zero-initialised output: an untrained memory adds nothing to the residual stream.
        self.o_proj = nn.Linear(dim, hidden_size, bias=False)
        self.chunk_size = chunk_size
        self.max_lr = max_lr
        self.scale = math.sqrt(dim)  # cosine similarities * sqrt(m): a moderately sharp address

    def _address(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, m) -> (B, T, S): softmax over slots of the cosine similarity
        return torch.softmax(F.normalize(x, dim=-1) @ F.normalize(self.slot_keys, dim=-1).T * self.scale, dim=-1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                method: str | None = None, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """Memory read-out to add to the residual stream.

        Args:
            hidden: (B, T, C) residual stream.
            mask: optional (B, T) 1 for real tokens, 0 for padding.
            method: ``"explicit"``, ``"dual"`` or None (choose by cost).
            anchors: optional (T,) or (B, T) base position of every token (see the module
                docstring), (T,) for the same layout in every row: only the base prefix
                writes; a thought token reads its anchor's state.
        Returns:
            (B, T, C) the projected reads; a token reads the memory written by earlier chunks
            (a thought token: by the chunks before its anchor's chunk).
        Raises:
            ValueError: bad ``anchors`` (see ``base_length``; (B, T) anchors need B rows), or
                ``anchors`` with ``mask``.
        """
        bsz, seq, _ = hidden.shape
        n_base = seq
        if anchors is not None:
            if mask is not None:
                raise ValueError("TitansMemory: anchors with a padding mask are not supported")
            n_base = base_length(anchors, seq, batch=bsz)
            anchors = anchors.to(hidden.device, torch.long).expand(bsz, seq)  # (B, T), long for gather
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        writers = x if anchors is None else x[:, :n_base]  # only the base tokens write
        write_addr = self._address(self.k_proj(writers))  # (B, n_base, S)
        read_addr = self._address(self.q_proj(x))  # (B, T, S)
        values = self.v_proj(writers)  # (B, n_base, m)
        thoughts = {}
        if anchors is not None:  # the thought tokens only read, each its anchor's pre-write state
            thoughts = {"thought_addr": read_addr[:, n_base:], "thought_chunk": anchors[:, n_base:] // self.chunk_size}
            x, read_addr, seq = writers, read_addr[:, :n_base], n_base
        tok = x.new_ones(bsz, seq) if mask is None else mask.to(x.dtype)  # (B, T)
        # Chunk gates: the mean over a chunk's real tokens of the per-token gates. (B, C, 3)
        chunks = -(-seq // self.chunk_size)
        pad = chunks * self.chunk_size - seq
        g = F.pad(torch.sigmoid(self.gates(x)) * tok.unsqueeze(-1), (0, 0, 0, pad))
        count = F.pad(tok, (0, pad)).view(bsz, chunks, self.chunk_size).sum(-1).clamp_min(1.0)  # (B, C)
        g = g.view(bsz, chunks, self.chunk_size, 3).sum(2) / count.unsqueeze(-1)
        eta, theta, alpha = g[..., 0], g[..., 1] * self.max_lr, g[..., 2]  # (B, C) each
        # The dual form never builds the (B, S, m) state and is far faster on CPU (measured
        # 11x at T=256, S=8192, m=216); its (B, T, T) kernels bound it to moderate T.
        if method is None:  # (with thoughts, the dual's kernels are (n_base + thoughts, n_base))
            total = seq + (thoughts["thought_addr"].shape[1] if thoughts else 0)
            method = "dual" if seq * total <= 16 * write_addr.shape[-1] * values.shape[-1] else "explicit"
        run = {"dual": self._dual, "explicit": self._explicit}[method]
        return self.o_proj(run(write_addr, read_addr, values, tok, eta, theta, alpha, count, **thoughts))  # (B, T, C)

    def _explicit(self, write_addr, read_addr, values, tok, eta, theta, alpha, count,
                  thought_addr=None, thought_chunk=None):
        """Chunk by chunk with the memory as a (B, S, m) tensor: the formulas as written.
        Thought reads (``thought_addr`` (B, Tt, S), ``thought_chunk`` (B, Tt)) use the kept
        pre-write state of their anchor's chunk: per chunk, every row's thoughts of that chunk,
        padded to the largest such group over the rows, read its state in one batched product
        (no padding when the rows share a layout)."""
        bsz, seq, slots = write_addr.shape
        m = values.new_zeros(bsz, slots, values.shape[-1])  # (B, S, m) empty memory
        s = torch.zeros_like(m)  # momentum of the surprise
        reads, states = [], []
        for c, start in enumerate(range(0, seq, self.chunk_size)):
            sl = slice(start, start + self.chunk_size)
            states.append(m)
            reads.append(read_addr[:, sl] @ m)  # (B, c, m): read before this chunk's write
            grad = associative_grad(m, write_addr[:, sl], values[:, sl], tok[:, sl])
            m, s = memory_update(m, s, grad, eta[:, c].view(-1, 1, 1), theta[:, c].view(-1, 1, 1),
                                 alpha[:, c].view(-1, 1, 1))
        if thought_addr is not None and thought_addr.shape[1]:  # group each row's thoughts by chunk, read, unsort
            thoughts = thought_chunk.shape[1]
            order = torch.argsort(thought_chunk, dim=1, stable=True)  # (B, Tt)
            sizes = torch.zeros(bsz, len(states), dtype=torch.long, device=thought_chunk.device)
            sizes.scatter_add_(1, thought_chunk, torch.ones_like(thought_chunk))  # (B, C) thoughts per chunk
            starts = sizes.cumsum(1) - sizes  # (B, C) where a row's group begins in its sorted order
            widths = sizes.max(0).values.tolist()  # (C,) group width, padded over the rows
            groups = []
            for c, (width, state) in enumerate(zip(widths, states)):
                if width:  # padding slots repeat a thought of the row; their reads are dropped below
                    slot = (starts[:, c:c + 1] + torch.arange(width, device=order.device)).clamp_max(thoughts - 1)
                    pick = order.gather(1, slot).unsqueeze(-1).expand(-1, -1, slots)  # (B, width, S)
                    groups.append(thought_addr.gather(1, pick) @ state)  # (B, width, m)
            offsets = torch.tensor([0] + widths[:-1], device=order.device).cumsum(0)  # (C,) group starts
            rank = torch.argsort(order, dim=1)  # (B, Tt) each thought's place in its row's sorted order
            where = offsets[thought_chunk] + rank - starts.gather(1, thought_chunk)  # (B, Tt)
            reads.append(torch.cat(groups, dim=1).gather(1, where.unsqueeze(-1).expand(-1, -1, values.shape[-1])))
        return torch.cat(reads, dim=1)  # (B, T, m)

    def _dual(self, write_addr, read_addr, values, tok, eta, theta, alpha, count,
              thought_addr=None, thought_chunk=None):
        """The same recurrence in token space. M and S start at zero and every write adds
        a_j^T e_j (rank <= chunk), so M_c = sum_{j<=c} mu_{c,j} A_j^T E_j with scalar
        coefficients: sigma <- eta * sigma; sigma_c = -theta_c / n_c; mu <- (1 - alpha) mu + sigma.
        Reads and errors then need only the kernels B A^T and A A^T over tokens. A thought
        read is B_t M_{c-1} for its anchor's chunk c (``thought_chunk`` (B, Tt)), from the kept
        coefficients of M_{c-1}."""
        bsz, seq, _ = write_addr.shape
        k_aa = write_addr @ write_addr.transpose(1, 2)  # (B, T, T) a_t . a_u
        k_ba = read_addr @ write_addr.transpose(1, 2)  # (B, T, T) b_t . a_u
        sigma = mu = values.new_zeros(bsz, 0)  # (B, chunks written so far)
        errors, reads, mus = [], [], []
        for c, start in enumerate(range(0, seq, self.chunk_size)):
            sl = slice(start, start + self.chunk_size)
            mus.append(mu)
            if start:
                weighted = torch.cat(errors, 1) * mu.repeat_interleave(self.chunk_size, 1).unsqueeze(-1)  # (B, t, m)
                reads.append(k_ba[:, sl, :start] @ weighted)  # (B, c, m) = B_c M_{c-1}
                pred = k_aa[:, sl, :start] @ weighted  # (B, c, m) = A_c M_{c-1}
            else:
                reads.append(values.new_zeros(bsz, min(self.chunk_size, seq), values.shape[-1]))
                pred = torch.zeros_like(reads[0])
            errors.append((pred - values[:, sl]) * tok[:, sl].unsqueeze(-1))  # E_c, padding masked
            sigma = torch.cat([eta[:, c:c + 1] * sigma, -(theta[:, c] / count[:, c]).unsqueeze(1)], dim=1)
            mu = torch.cat([(1.0 - alpha[:, c:c + 1]) * mu, mu.new_zeros(bsz, 1)], dim=1) + sigma
        if thought_addr is not None:
            chunks = len(mus)
            # mu_pre[:, c, j]: coefficient of chunk j's write in the state chunk c reads (0 for j >= c).
            mu_pre = torch.stack([F.pad(v, (0, chunks - v.shape[1])) for v in mus], dim=1)  # (B, C, C)
            token_chunk = torch.arange(seq, device=thought_chunk.device) // self.chunk_size  # (T,)
            rows = torch.arange(bsz, device=thought_chunk.device).unsqueeze(1)  # (B, 1)
            coef = mu_pre[rows, thought_chunk][:, :, token_chunk]  # (B, Tt, C) -> (B, Tt, T)
            kernel = thought_addr @ write_addr.transpose(1, 2)  # (B, Tt, T) b_t . a_u
            reads.append((kernel * coef) @ torch.cat(errors, 1))  # (B, Tt, m)
        return torch.cat(reads, dim=1)  # (B, T, m)
