"""Benchmark: wire codec throughput for tensor-bearing messages, against pickle 5 and memcpy.

A message is a dict with a few metadata fields plus float32 tensors (one below 1 MiB, four
from 1 MiB up) totalling SIZE bytes. Each row times, in the same run and on the same data:

- ours:        serialization.packb + serialization.unpackb (round trip; encode and decode
               are also shown apart)
- pickle5:     pickle.dumps(msg, protocol=5) + pickle.loads (benchmark only; the product
               never pickles)
- memcpy:      one copy of the payload into a new buffer, bytearray(buf): the cost of the
               one copy any encoder that returns fresh bytes must make
- copyto:      np.copyto into a buffer allocated (and touched) beforehand: raw copy
               bandwidth with no allocation or page faults, the ceiling

Throughput is payload MB/s (1 MB = 1e6 bytes) of the median of several repeats after a
warm-up; "enc" and "dec" are the two halves of ours' round trip. Methods are interleaved
within each repeat, since fresh-memory page faults (which depend on the allocator's history)
dominate large copies. Targets from the issue: ours >= 1.0x pickle5 from 1 MiB up; ours >=
0.5x memcpy at 256 MiB.

Usage: python benchmarks/serialization.py [--json] [--quick] [--payload torch|numpy] [--sizes 1M,256M]
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serialization import packb, unpackb  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = [1 * KiB, 16 * KiB, 256 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
QUICK_SIZES = [1 * KiB, 16 * KiB, 256 * KiB, 1 * MiB, 16 * MiB]


def make_message(size: int, payload: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A message carrying ``size`` bytes of float32 tensors, and views of their buffers."""
    n = 1 if size < MiB else 4
    gen = torch.Generator().manual_seed(size)
    tensors = [torch.randn(size // 4 // n, generator=gen) for _ in range(n)]
    values: list[Any] = tensors if payload == "torch" else [t.numpy() for t in tensors]
    msg = {"step": 1234, "phase": "evomerge", "candidate": "gen3/member7",
           "metrics": {"loss": 0.25, "accuracy": 0.75}, "tensors": values}
    return msg, [t.numpy() for t in tensors]


def roundtrip_timer(encode: Callable[[Any], Any], decode: Callable[[Any], Any], msg: Any) -> Callable[[int], tuple[float, float]]:
    """A sampler: run ``loops`` round trips, return seconds spent encoding and decoding per op."""
    def sample(loops: int) -> tuple[float, float]:
        t_enc = t_dec = 0.0
        for _ in range(loops):
            start = time.perf_counter()
            data = encode(msg)
            mid = time.perf_counter()
            out = decode(data)
            t_enc += mid - start
            t_dec += time.perf_counter() - mid
            del data, out  # freed in the same order for every method
        return t_enc / loops, t_dec / loops
    return sample


def copy_timer(fn: Callable[[], Any]) -> Callable[[int], tuple[float, float]]:
    def sample(loops: int) -> tuple[float, float]:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        return (time.perf_counter() - start) / loops, 0.0
    return sample


def check_roundtrip(msg: dict[str, Any], out: dict[str, Any]) -> None:
    for a, b in zip(msg["tensors"], out["tensors"], strict=True):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), "codec round trip changed a tensor"
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b), "codec round trip changed an array"
    assert {k: v for k, v in out.items() if k != "tensors"} == {k: v for k, v in msg.items() if k != "tensors"}


def bench_size(size: int, payload: str, repeats: int) -> dict[str, Any]:
    """Time every method on one message size.

    Methods are interleaved within each repeat so that they all see the same allocator
    state (glibc's mmap and trim thresholds move with the history of frees, and page
    faults on fresh memory dominate large copies), then the median per method is taken.
    """
    msg, buffers = make_message(size, payload)
    check_roundtrip(msg, unpackb(packb(msg)))
    targets = [np.ones_like(b) for b in buffers]  # allocated and touched before timing
    samplers = {
        "ours": roundtrip_timer(packb, unpackb, msg),
        "pickle5": roundtrip_timer(lambda m: pickle.dumps(m, protocol=5), pickle.loads, msg),
        "memcpy": copy_timer(lambda: [bytearray(b.data) for b in buffers]),
        "copyto": copy_timer(lambda: [np.copyto(d, s) for d, s in zip(targets, buffers)]),
    }
    loops = {}
    for name, sample in samplers.items():  # warm-up, and loops so that small sizes run >= 20 ms
        once = max(sum(sample(1)), 1e-7)
        loops[name] = max(1, int(0.02 / once))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in samplers}
    for _ in range(repeats):
        for name, sample in samplers.items():
            gc.collect()
            results[name].append(sample(loops[name]))
    del targets, msg, buffers
    gc.collect()

    def median_total(name: str) -> float:
        return statistics.median(e + d for e, d in results[name])

    t_ours, t_pickle = median_total("ours"), median_total("pickle5")
    t_memcpy, t_copyto = median_total("memcpy"), median_total("copyto")
    t_enc = statistics.median(e for e, _ in results["ours"])
    t_dec = statistics.median(d for _, d in results["ours"])

    def mbps(t: float) -> float:
        return size / t / 1e6

    return {"size_bytes": size, "ours_encode_mbps": mbps(t_enc), "ours_decode_mbps": mbps(t_dec),
            "ours_mbps": mbps(t_ours), "pickle5_mbps": mbps(t_pickle), "memcpy_mbps": mbps(t_memcpy),
            "copyto_mbps": mbps(t_copyto), "ours_over_pickle5": t_pickle / t_ours,
            "ours_over_memcpy": t_memcpy / t_ours, "ours_over_copyto": t_copyto / t_ours,
            "ours_roundtrip_us": t_ours * 1e6}


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--quick", action="store_true", help="sizes up to 16 MiB, 3 repeats")
    parser.add_argument("--payload", choices=["torch", "numpy"], default="torch",
                        help="carry torch tensors (default) or numpy arrays")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated sizes with K/M suffix, e.g. 1M,256M (default: the issue's list)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 7, quick 3)")
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        units = {"K": KiB, "M": MiB}
        sizes = [int(x[:-1]) * units[x[-1].upper()] for x in args.sizes.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)

    rows = []
    header = (f"{'size':>8} {'ours MB/s':>10} {'enc MB/s':>9} {'dec MB/s':>9} {'pickle5':>9} "
              f"{'memcpy':>9} {'copyto':>9} {'/pickle5':>9} {'/memcpy':>8} {'/copyto':>8}")
    print(f"serialization codec, {args.payload} float32 payloads, median of {repeats} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()})")
    print(header)
    print("-" * len(header))
    for size in sizes:
        r = bench_size(size, args.payload, repeats)
        rows.append(r)
        print(f"{fmt_size(size):>8} {r['ours_mbps']:>10.0f} {r['ours_encode_mbps']:>9.0f} "
              f"{r['ours_decode_mbps']:>9.0f} {r['pickle5_mbps']:>9.0f} {r['memcpy_mbps']:>9.0f} "
              f"{r['copyto_mbps']:>9.0f} {r['ours_over_pickle5']:>8.2f}x {r['ours_over_memcpy']:>7.2f}x "
              f"{r['ours_over_copyto']:>7.2f}x", flush=True)

    big = [r for r in rows if r["size_bytes"] >= MiB]
    at_256 = [r for r in rows if r["size_bytes"] == 256 * MiB]
    targets = {
        "ours_ge_pickle5_from_1MiB": all(r["ours_over_pickle5"] >= 1.0 for r in big) if big else None,
        "ours_ge_half_memcpy_at_256MiB": at_256[0]["ours_over_memcpy"] >= 0.5 if at_256 else None,
    }
    print(f"targets: ours >= 1.0x pickle5 from 1 MiB: {targets['ours_ge_pickle5_from_1MiB']}; "
          f"ours >= 0.5x memcpy at 256 MiB: {targets['ours_ge_half_memcpy_at_256MiB']}")
    if args.json:
        print(json.dumps({"benchmark": "serialization", "payload": args.payload, "repeats": repeats,
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "rows": rows, "targets": targets}))


if __name__ == "__main__":
    main()
