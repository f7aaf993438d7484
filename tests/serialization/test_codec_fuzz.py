"""Fuzz test of the decoder: 100,000+ mutated or truncated messages must decode or raise DecodeError.

Mutations: bit flips, byte replacements (random and msgpack-significant values), insertions,
deletions, truncations and splices, aimed mostly at the header and msgpack body (where the
parser lives) rather than raw tensor bytes. Half of the length-changing mutations fix the
header's length fields up afterwards, so the mutated body reaches the msgpack parser and our
hooks instead of failing the frame-length check. A share of the mutants also go through
StreamDecoder in random chunks. The loop is seeded and runs without hypothesis overhead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import re
import struct
import warnings
import zoneinfo

import numpy as np
import pytest
import torch

from serialization import DecodeError, Limits, StreamDecoder, packb, register_dataclass, unpackb

ITERATIONS = 100_000
SEED = 20240601
# Small limits make the limit checks reachable; the default limits are fuzzed too.
LIMITS = [Limits(), Limits(max_depth=8, max_container_len=64, max_str_len=64, max_bin_len=64,
                            max_tensor_bytes=4096, max_message_bytes=1 << 16)]
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7,
               0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDC,
               0xDD, 0xDE, 0xDF, 0xE0, 0xFF, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x40]
_LEN = struct.Struct("<QQ")


@register_dataclass("fuzz.record")
@dataclasses.dataclass
class Record:
    name: str
    values: list
    extra: dict = dataclasses.field(default_factory=dict)


def seed_corpus() -> list[bytes]:
    """Varied valid messages: every ext type, nesting, limits-relevant sizes."""
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is experimental in torch and warns on creation
        c32 = torch.zeros(3, dtype=torch.complex32)
    objs = [
        None, True, 0, -(2**63), 2**64 - 1, 3.25, "text", b"\x00\x01", [], (), {},
        {"step": 7, "phase": "evomerge", "metrics": {"loss": 0.5, "acc": [0.1, 0.2]}},
        [1, [2, [3, [4, [5, [6, [7, [8, [9]]]]]]]]],
        (1, (2, (3,)), [4, (5, 6)]),
        {1: "a", b"k": (1, 2), (3, "t"): None, 2.5: [True]},
        torch.randn(4, 5, generator=gen),
        torch.arange(24, dtype=torch.int64).reshape(2, 3, 4).transpose(0, 2),
        torch.randn(3, 3, generator=gen).to(torch.bfloat16),
        torch.zeros(2, 2, dtype=torch.float8_e4m3fn),
        torch.tensor([True, False, True]),
        c32,
        torch.empty(0, 3),
        torch.tensor(1.5),
        np.arange(12, dtype=">i4").reshape(3, 4),
        np.zeros((2, 0, 3), dtype=np.complex128),
        np.float32(2.5), np.bool_(True), np.uint64(2**63),
        dt.datetime(2024, 5, 6, 7, 8, 9, 10),
        dt.datetime(2024, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=2), "CEST")),
        Record("r", [1, torch.ones(2)], {"nested": Record("s", [])}),
        {"tensors": [torch.randn(8, generator=gen) for _ in range(4)], "arrays": (np.ones(3), np.eye(2))},
        ["x" * 70, b"y" * 70, list(range(70)), {str(i): i for i in range(70)}],
    ]
    try:  # the IANA database ships with the OS; slim images may lack it
        objs.append(dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")))
    except zoneinfo.ZoneInfoNotFoundError:
        pass
    return [packb(o) for o in objs]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> tuple[str, bytes]:
    """Return (kind, mutant). Positions favour the header and body over raw payload bytes."""
    buf = bytearray(data)
    body_end = min(len(buf), 24 + _LEN.unpack_from(buf, 8)[0])

    def pos() -> int:
        r = rng.random()
        if r < 0.1 or body_end <= 24:
            return rng.randrange(min(24, len(buf)))
        return rng.randrange(24, body_end) if r < 0.85 else rng.randrange(len(buf))

    kind = rng.choice(["bitflip", "replace", "interesting", "insert", "delete", "truncate", "splice"])
    if kind == "bitflip":
        for _ in range(rng.randint(1, 4)):
            buf[pos()] ^= 1 << rng.randrange(8)
    elif kind == "replace":
        for _ in range(rng.randint(1, 4)):
            buf[pos()] = rng.randrange(256)
    elif kind == "interesting":
        for _ in range(rng.randint(1, 2)):
            buf[pos()] = rng.choice(INTERESTING)
    elif kind == "insert":
        i = pos()
        buf[i:i] = bytes(rng.choice(INTERESTING + [rng.randrange(256)]) for _ in range(rng.randint(1, 8)))
    elif kind == "delete":
        i = pos()
        del buf[i: i + rng.randint(1, 8)]
    elif kind == "truncate":
        del buf[rng.randrange(len(buf)):]
    else:  # splice: this message's head with another's tail
        other = rng.choice(corpus)
        buf = buf[: pos()] + other[rng.randrange(len(other)):]
    if kind in ("insert", "delete", "splice") and len(buf) > 24 and rng.random() < 0.5:
        # Re-point the header at the mutated body so the msgpack parser sees it.
        if kind == "splice":
            body_len = rng.randrange(1, len(buf) - 23)
        else:
            body_len = max(1, min(len(buf) - 24, body_end - 24 + len(buf) - len(data)))
        payload_start = -(-(24 + body_len) // 64) * 64
        _LEN.pack_into(buf, 8, body_len, max(0, len(buf) - payload_start))
        kind += "+fixup"
    return kind, bytes(buf)


def check(data: bytes, limits: Limits) -> str:
    try:
        unpackb(data, limits=limits)
    except DecodeError as exc:
        return re.sub(r"\d[\d.e+]*", "N", str(exc))[:24]  # the kind of error, without its numbers
    return "ok"


def check_stream(rng: random.Random, data: bytes, limits: Limits) -> None:
    dec = StreamDecoder(limits)
    try:
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 64)
            dec.feed(data[pos: pos + n])
            pos += n
            list(dec)
        dec.close()
    except DecodeError:
        pass


def run_fuzz(iterations: int, seed: int) -> None:
    corpus = seed_corpus()
    for data in corpus:  # the seeds themselves are valid
        unpackb(data)
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    kinds: dict[str, int] = {}
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning on hostile input is a bug too
        for i in range(iterations):
            seed_msg = rng.choice(corpus)
            kind, mutant = mutate(rng, seed_msg, corpus)
            kinds[kind] = kinds.get(kind, 0) + 1
            limits = LIMITS[i & 1]
            try:
                outcome = check(mutant, limits)
                if i % 20 == 0:
                    check_stream(rng, mutant, limits)
            except Exception as exc:  # anything but DecodeError is the bug this test hunts
                failures.append(f"#{i} {kind}: {type(exc).__name__}: {exc} :: {mutant.hex()}")
                if len(failures) >= 10:
                    break
                continue
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not failures, "\n".join(failures)
    # The fuzzer must reach deep: many messages decode and many kinds of error are raised.
    assert sum(kinds.values()) == iterations
    assert outcomes.get("ok", 0) > iterations // 50, outcomes
    assert len(outcomes) > 40, sorted(outcomes)


def test_fuzzed_messages_decode_or_raise_decode_error() -> None:
    run_fuzz(ITERATIONS, SEED)


@pytest.mark.slow
def test_fuzz_400k_more_messages() -> None:
    """Default-run sibling: the fuzz tests above, on fewer messages."""
    run_fuzz(400_000, SEED + 1)


@pytest.mark.parametrize("cut", range(0, 200, 7))
def test_every_truncation_of_a_message_is_a_decode_error(cut: int) -> None:
    data = packb({"t": torch.arange(10.0), "r": Record("x", [np.ones(2)]), "d": dt.datetime(2024, 1, 1)})
    assert cut < len(data)
    with pytest.raises(DecodeError):
        unpackb(data[:cut])
