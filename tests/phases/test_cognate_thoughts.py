"""Cognate on Quiet-STaR's extended sequence (phases/quietstar/mask.py): a bool 4-D attention mask
is used as-is by every attention, and ``memory_anchors`` keep the Titans memory from leaking
across thoughts (only base tokens write; a thought reads its anchor's pre-chunk state)."""

from __future__ import annotations

import pytest
import torch

from phases.cognate import CognateForCausalLM, CognateModelConfig, TitansMemory
from phases.quietstar.mask import thought_attention_mask, thought_layout, thought_position_ids

L, STEPS, CHUNK = 6, 3, 2  # base length, thought tokens per position, memory chunk (3 base chunks)


def _model(seed: int = 0, **kw) -> CognateForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               memory_slots=16, memory_chunk_size=CHUNK, memory_enabled=True)
    cfg.update(kw)
    model = CognateForCausalLM(CognateModelConfig(**cfg)).eval()
    torch.nn.init.normal_(model.model.memory.o_proj.weight, std=0.5)  # zero-initialised: make reads visible
    return model


def _idx(i: int, j: int) -> int:
    """Index of the j-th thought token of base position i in the extended sequence."""
    return L + j * L + i


def _thoughts(i: int) -> list[int]:
    return [_idx(i, j) for j in range(STEPS)]


def _extended(seed: int = 1) -> dict:
    """Extended-sequence inputs of one row: ids (1, T), mask (1, 1, T, T), positions (1, T), anchors (T,)."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 256, (1, L * (1 + STEPS)), generator=g),
            "attention_mask": thought_attention_mask(L, STEPS)[None, None],
            "position_ids": thought_position_ids(L, STEPS)[None],
            "memory_anchors": thought_layout(L, STEPS)[0]}


# ---------------------------------------------------------------- the 4-D mask

@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("mask_batch", [1, 2])
def test_causal_4d_mask_matches_the_no_mask_path(memory, mask_batch):
    model = _model(memory_enabled=memory)
    x = torch.randint(0, 256, (2, 11))
    causal = torch.ones(11, 11, dtype=torch.bool).tril().expand(mask_batch, 1, 11, 11)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        torch.testing.assert_close(model(input_ids=x, attention_mask=causal).logits, ref, rtol=0, atol=1e-5)
        # used as-is: an all-True mask is bidirectional, not "nothing masked, so causal"
        full = model(input_ids=x, attention_mask=torch.ones(1, 1, 11, 11, dtype=torch.bool)).logits
        assert not torch.allclose(full[:, 0], ref[:, 0], atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_base_logits_on_the_extended_sequence_match_the_base_alone(train):
    model = _model().train(train)
    ext = _extended()
    with torch.no_grad():
        logits = model(**ext).logits
        alone = model(input_ids=ext["input_ids"][:, :L]).logits
    torch.testing.assert_close(logits[:, :L], alone, rtol=0, atol=1e-5)


def test_thought_logits_match_the_thought_run_as_a_plain_sequence():
    # Without memory a thought is exactly its anchor's prefix followed by its own tokens.
    model = _model(memory_enabled=False)
    ext = _extended()
    ids = ext["input_ids"]
    with torch.no_grad():
        logits = model(**ext).logits
        for i in range(L):
            plain = torch.cat([ids[:, :i + 1], ids[:, _thoughts(i)]], dim=1)  # positions 0..i+STEPS
            ref = model(input_ids=plain).logits
            torch.testing.assert_close(logits[:, _thoughts(i)], ref[:, i + 1:], rtol=0, atol=1e-5)


def test_gradients_stay_inside_each_thought():
    model = _model().train()
    ext = _extended()
    embeds = model.get_input_embeddings()(ext.pop("input_ids")).detach().requires_grad_(True)  # (1, T, C)
    weights = torch.randn(STEPS, 258, generator=torch.Generator().manual_seed(2))
    for i in range(L):
        logits = model(inputs_embeds=embeds, **ext).logits
        (grad,) = torch.autograd.grad((logits[0, _thoughts(i)] * weights).sum(), embeds)
        per_token = grad[0].abs().sum(-1)  # (T,)
        own = set(_thoughts(i)) | set(range(i + 1))
        assert (per_token[list(own)] > 0).all(), (i, per_token)
        others = [t for t in range(per_token.shape[0]) if t not in own]  # later base tokens, other thoughts
        assert (per_token[others] == 0).all(), (i, per_token)


def test_thoughts_read_the_memory_state_of_their_anchor_chunk():
    # Base tokens after the anchor (the rest of its chunk and every later chunk) are hidden from
    # its thoughts by the mask, so only a memory that reads a too-late state could leak them.
    model = _model()
    ext = _extended()
    with torch.no_grad():
        logits = model(**ext).logits
        for i in range(L - 1):
            changed = dict(ext, input_ids=ext["input_ids"].clone())
            changed["input_ids"][0, i + 1:L] = (changed["input_ids"][0, i + 1:L] + 1) % 256
            other = model(**changed).logits
            torch.testing.assert_close(other[:, _thoughts(i)], logits[:, _thoughts(i)], rtol=0, atol=1e-6)
            assert not torch.allclose(other[:, i + 1:L], logits[:, i + 1:L])  # the change is real
        model.config.memory_enabled = False  # ... and the memory does reach a chunk-1 thought
        assert not torch.allclose(model(**ext).logits[:, _thoughts(3)], logits[:, _thoughts(3)], atol=1e-4)


@pytest.mark.parametrize("method", ["explicit", "dual"])
def test_anchored_memory_reads_equal_the_anchor_read_with_the_thought_query(method):
    # Reference: a thought's read is its anchor's read in the base sequence whose row at the
    # anchor is the thought's hidden state (that row writes only after the anchor's chunk read).
    torch.manual_seed(0)
    memory = TitansMemory(hidden_size=16, slots=12, dim=8, chunk_size=CHUNK, max_lr=1.0).double()
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.o_proj.weight)
    anchors = thought_layout(L, STEPS)[0]
    hidden = torch.randn(2, L * (1 + STEPS), 16, dtype=torch.float64)
    out = memory(hidden, method=method, anchors=anchors)
    torch.testing.assert_close(out[:, :L], memory(hidden[:, :L], method=method), rtol=1e-10, atol=1e-12)
    for t in range(L, hidden.shape[1]):
        a = int(anchors[t])
        swapped = hidden[:, :L].clone()
        swapped[:, a] = hidden[:, t]
        torch.testing.assert_close(out[:, t], memory(swapped, method=method)[:, a], rtol=1e-10, atol=1e-12)
    assert out[:, L:].abs().max() > 1e-3  # thoughts anchored after chunk 0 really read something


def test_anchored_dual_form_equals_the_explicit_form():
    torch.manual_seed(0)
    memory = TitansMemory(hidden_size=16, slots=12, dim=8, chunk_size=4, max_lr=1.0).double()
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.o_proj.weight)
    # 13 base tokens (a ragged last chunk), then 17 thoughts anchored in no particular order
    anchors = torch.cat([torch.arange(13), torch.randint(0, 13, (17,))])
    hidden = torch.randn(3, anchors.shape[0], 16, dtype=torch.float64)
    explicit = memory(hidden, method="explicit", anchors=anchors)
    torch.testing.assert_close(memory(hidden, method="dual", anchors=anchors), explicit, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- a thought layout per row

def _row_layout(chains: list[int]) -> dict:
    """One row's extended sequence with a chain of STEPS thought tokens anchored at each of
    ``chains`` (in that order): anchors (T,), bool mask (T, T), positions (T,), as in
    ``phases/quietstar/mask.py`` (a thought sees its anchor's causal prefix and its own chain)."""
    n = len(chains)
    anchors = torch.cat([torch.arange(L), torch.tensor(chains).repeat(STEPS)])
    depth = torch.cat([torch.zeros(L, dtype=torch.long), torch.arange(1, STEPS + 1).repeat_interleave(n)])
    chain = torch.cat([torch.full((L,), -1), torch.arange(n).repeat(STEPS)])
    sees_base = (depth[None, :] == 0) & (anchors[None, :] <= anchors[:, None])
    sees_own_chain = (depth[None, :] > 0) & (chain[None, :] == chain[:, None]) & (depth[None, :] <= depth[:, None])
    return {"anchors": anchors, "mask": sees_base | sees_own_chain, "positions": anchors + depth}


# Two rows, L chains each: the paper's layout, and one whose thoughts fall unevenly on the memory
# chunks (per chunk 1, 3, 2 chains instead of 2, 2, 2) and in another order.
ROW_CHAINS = [list(range(L)), [5, 5, 2, 0, 3, 3]]


def _batched_extended(seed: int = 1) -> dict:
    """Extended-sequence inputs of len(ROW_CHAINS) rows with per-row (B, T) anchors."""
    rows = [_row_layout(chains) for chains in ROW_CHAINS]
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 256, (len(rows), L * (1 + STEPS)), generator=g),
            "attention_mask": torch.stack([r["mask"] for r in rows])[:, None],
            "position_ids": torch.stack([r["positions"] for r in rows]),
            "memory_anchors": torch.stack([r["anchors"] for r in rows])}


def _row(ext: dict, b: int) -> dict:
    """Row b of ``_batched_extended`` as a batch of one with (T,) anchors."""
    return {"input_ids": ext["input_ids"][b:b + 1], "attention_mask": ext["attention_mask"][b:b + 1],
            "position_ids": ext["position_ids"][b:b + 1], "memory_anchors": ext["memory_anchors"][b]}


def _random_memory(chunk_size: int) -> TitansMemory:
    torch.manual_seed(0)
    memory = TitansMemory(hidden_size=16, slots=12, dim=8, chunk_size=chunk_size, max_lr=1.0).double()
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.o_proj.weight)
    return memory


def test_row_layout_of_every_position_is_thought_layout():
    ref = _row_layout(list(range(L)))
    assert torch.equal(ref["anchors"], thought_layout(L, STEPS)[0])
    assert torch.equal(ref["mask"], thought_attention_mask(L, STEPS))
    assert torch.equal(ref["positions"], thought_position_ids(L, STEPS))


@pytest.mark.parametrize("method", ["explicit", "dual"])
def test_per_row_anchored_memory_reads_equal_each_row_alone(method):
    memory = _random_memory(chunk_size=4)
    # 13 base tokens (a ragged last chunk), then 17 thoughts per row, anchored independently per row
    g = torch.Generator().manual_seed(3)
    anchors = torch.cat([torch.arange(13).expand(3, 13), torch.randint(0, 13, (3, 17), generator=g)], dim=1)
    anchors[2, 13:] = 12  # one row with every thought in the last chunk: uneven chunk groups
    hidden = torch.randn(3, anchors.shape[1], 16, dtype=torch.float64)
    out = memory(hidden, method=method, anchors=anchors)
    for b in range(3):
        alone = memory(hidden[b:b + 1], method=method, anchors=anchors[b])
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-10, atol=1e-12)
    other = {"explicit": "dual", "dual": "explicit"}[method]
    torch.testing.assert_close(memory(hidden, method=other, anchors=anchors), out, rtol=1e-10, atol=1e-12)
    # the rows' layouts matter: row 1 read with row 0's anchors differs
    assert not torch.allclose(memory(hidden[1:2], method=method, anchors=anchors[0])[:, 13:], out[1:2, 13:])


def test_per_row_anchors_give_each_row_its_logits_alone():
    model = _model()
    ext = _batched_extended()
    with torch.no_grad():
        logits = model(**ext).logits
        for b in range(len(ROW_CHAINS)):
            torch.testing.assert_close(logits[b:b + 1], model(**_row(ext, b)).logits, rtol=0, atol=1e-5)
        # the per-row memory layout matters: row 1 with row 0's anchors reads other states
        swapped = dict(_row(ext, 1), memory_anchors=ext["memory_anchors"][0])
        assert not torch.allclose(model(**swapped).logits[:, L:], logits[1:2, L:], atol=1e-4)


@pytest.mark.parametrize("method", ["explicit", "dual"])
def test_shared_anchors_equal_the_same_anchors_per_row(method):
    memory = _random_memory(chunk_size=CHUNK)
    anchors = thought_layout(L, STEPS)[0]
    hidden = torch.randn(2, anchors.shape[0], 16, dtype=torch.float64)
    shared = memory(hidden, method=method, anchors=anchors)
    torch.testing.assert_close(memory(hidden, method=method, anchors=anchors.expand(2, -1)), shared, rtol=0, atol=0)
    torch.testing.assert_close(memory(hidden, method=method, anchors=anchors.repeat(2, 1)), shared, rtol=0, atol=0)


@pytest.mark.parametrize("memory", [False, True])
def test_shared_anchors_equal_the_same_anchors_per_row_in_the_model(memory):
    model = _model(memory_enabled=memory)
    ext = _extended()
    ext.update(input_ids=torch.randint(0, 256, (2, L * (1 + STEPS))))
    with torch.no_grad():
        shared = model(**ext).logits
        per_row = model(**dict(ext, memory_anchors=ext["memory_anchors"].repeat(2, 1))).logits
    torch.testing.assert_close(per_row, shared, rtol=0, atol=0)


# ---------------------------------------------------------------- the existing paths and errors

@pytest.mark.parametrize("memory", [False, True])
def test_anchors_without_thoughts_change_nothing(memory):
    """Anchors 0..T-1 (every token a base token) with the causal 4-D mask give the plain
    forward's logits: the anchored memory path reduces to the ordinary one."""
    model = _model(memory_enabled=memory)
    x = torch.randint(0, 256, (2, 9))
    causal = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = model(input_ids=x).logits
        out = model(input_ids=x, attention_mask=causal, memory_anchors=torch.arange(9)).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def _bad_calls():
    T = L * (1 + STEPS)
    mask = thought_attention_mask(L, STEPS)[None, None]
    anchors = thought_layout(L, STEPS)[0]
    shifted = anchors.clone()
    shifted[0] = 1  # no base prefix
    out_of_range = anchors.clone()
    out_of_range[-1] = L  # a thought anchored at a thought
    negative = anchors.clone()
    negative[-1] = -1
    shorter_base = anchors.clone()
    shorter_base[L - 1] = 0  # row 1's base prefix is 0..L-2
    return {
        "float 4-D mask": ({"attention_mask": mask.float()}, r"bool of shape"),
        "wrong T": ({"attention_mask": mask[..., :-1, :-1]}, r"1, 1, 23, 23"),
        "wrong batch": ({"attention_mask": mask.expand(3, 1, T, T)}, r"\(3, 1, 24, 24\)"),
        "heads dim": ({"attention_mask": mask.expand(1, 2, T, T)}, r"\(1, 2, 24, 24\)"),
        "3-D mask": ({"attention_mask": mask[0]}, r"\(1, 24, 24\)"),
        "short anchors": ({"attention_mask": mask, "memory_anchors": anchors[:-1]}, r"shape \(24,\)"),
        "float anchors": ({"attention_mask": mask, "memory_anchors": anchors.float()}, r"integer tensor"),
        "no base prefix": ({"attention_mask": mask, "memory_anchors": shifted}, r"base prefix"),
        "anchor at a thought": ({"attention_mask": mask, "memory_anchors": out_of_range}, r"\[0, n_base\)"),
        "negative anchor": ({"attention_mask": mask, "memory_anchors": negative}, r"\[0, n_base\)"),
        "padding mask with anchors": ({"attention_mask": torch.ones(1, T, dtype=torch.long),
                                       "memory_anchors": anchors}, r"padding mask"),
        "3-D anchors": ({"attention_mask": mask, "memory_anchors": anchors.expand(1, 2, T)}, r"or \(B, 24\)"),
        "rows with other base prefixes": ({"attention_mask": mask,
                                           "memory_anchors": torch.stack([anchors, shorter_base])},
                                          r"same base prefix length; row 1 has 5, row 0 has 6"),
        "anchor rows != batch": ({"attention_mask": mask, "memory_anchors": anchors.expand(3, T)},
                                 r"3 rows, but the batch has 2"),
        "one row with a bad anchor": ({"attention_mask": mask, "memory_anchors": torch.stack([anchors, out_of_range])},
                                      r"\[0, n_base\); got in row 1 a base prefix of length 6"),
    }


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_masks_and_anchors_raise(case, memory):
    kwargs, match = _bad_calls()[case]
    model = _model(memory_enabled=memory)
    ids = torch.randint(0, 256, (2, L * (1 + STEPS)))
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, **kwargs)
