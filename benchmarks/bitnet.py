"""Benchmark: a packed BitNet b1.58 model against its fp32 original, side by side in one run.

One Cognate model of the given shape (random weights: size, memory and speed do not depend on
training) is saved as an fp32 HF dir; a copy gets every linear layer but the LM head replaced by
``BitLinear`` (``phases.bitnet.quant.replace_linears``) and is saved packed
(``phases.bitnet.packed.save_packed``, ``--format`` 2bit or base3). Then, each model in a fresh
subprocess (so one's allocations cannot hide the other's):

- size: bytes of the tensor file on disk (``model.safetensors`` vs ``bitnet.safetensors``), and
  bits per weight of the ternary layers as stored (packed codes + the per-tensor scale);
- peak memory: the growth of the process' peak RSS from just before loading the model to the end
  of the timed forwards: Linux's high-water mark is reset after the imports and a warm-up op
  (``/proc/self/clear_refs``), then ``VmHWM`` minus the ``VmRSS`` at that point, in a child whose
  glibc mmap threshold is fixed at 128 KiB so that freed temporaries leave RSS (``_measure``);
- latency (another child, the default allocator): p50 / p95 of ``--repeats`` forward passes on a fixed ``--batch`` x ``--seq`` batch of
  ids (no gradient, eval mode, ``--threads`` torch threads), after two warm-up passes.

The packed model is measured with both kernels (``phases/bitnet/packed.py``): ``decode`` (codes
decoded per layer per forward, 1.6-2 bits per weight in memory) and, on x86, ``int8`` (decoded
once at load into fbgemm's int8 weight, 8 bits per weight; same bytes on disk).

Ratios are fp32 / packed for size and memory, packed / fp32 for latency (below 1 = faster).

Usage: python benchmarks/bitnet.py [--d-model 512] [--layers 4] [--d-ff 1376] [--vocab 258]
       [--batch 4] [--seq 128] [--repeats 20] [--format 2bit|base3] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _child(kind: str, model_dir: str, warm_dir: str, batch: int, seq: int, repeats: int, threads: int) -> None:
    """Load one model, run the timed forwards, print one JSON line (run in a subprocess). A
    tiny model of the same kind is loaded and run first, so that lazy imports and one-off
    initialisation are not counted as the model's memory."""
    import gc

    import torch

    import phases.cognate.modeling  # noqa: F401 - registers the Cognate classes
    from transformers import AutoModelForCausalLM

    from phases.bitnet.packed import load_packed

    def load(path: str):
        if kind.startswith("packed"):
            return load_packed(path, kernel="int8" if kind == "packed-int8" else "decode").eval()
        return AutoModelForCausalLM.from_pretrained(path).eval()

    torch.set_num_threads(threads)
    ids = torch.randint(0, 200, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        load(warm_dir)(input_ids=ids[:1, :8])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    model = load(model_dir)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            model(input_ids=ids)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    times.sort()
    print(json.dumps({"peak_rss_growth_bytes": (peak - base) * 1024, "p50_ms": 1000 * statistics.median(times),
                      "p95_ms": 1000 * times[min(len(times) - 1, int(0.95 * len(times)))]}))


def _run_child(kind: str, model_dir: Path, warm_dir: Path, args, *, repeats: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(model_dir), str(warm_dir), "--batch", str(args.batch),
           "--seq", str(args.seq), "--repeats", str(repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(kind: str, model_dir: Path, warm_dir: Path, args) -> dict:
    """Latency from a child with the default allocator; peak memory from a second child whose
    glibc mmap threshold is fixed at 128 KiB (by default glibc raises it after every large free,
    after which freed temporaries stay in the heap and count as RSS; fixed, RSS follows live
    memory, but every large allocation is an mmap, which would distort the timing)."""
    timed = _run_child(kind, model_dir, warm_dir, args, repeats=args.repeats, env=dict(os.environ))
    fixed = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
    memory = _run_child(kind, model_dir, warm_dir, args, repeats=1, env=fixed)
    return {"p50_ms": timed["p50_ms"], "p95_ms": timed["p95_ms"],
            "peak_rss_growth_bytes": memory["peak_rss_growth_bytes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=258)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--format", choices=("2bit", "base3"), default="base3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "DIR", "WARM_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, args.batch, args.seq, args.repeats, args.threads)
        return 0

    import torch

    from phases.bitnet.packed import PACKED_FILE, PackedBitLinear, int8_kernel_available, save_packed
    from phases.bitnet.quant import replace_linears
    from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig

    cfg = CognateModelConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             max_position_embeddings=max(256, args.seq))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = CognateForCausalLM(cfg).eval()
        model.save_pretrained(str(tmp / "fp32"))
        params = sum(p.numel() for p in model.parameters())
        replace_linears(model)
        save_packed(model, tmp / "packed", args.format)
        layers = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
        ternary_weights = sum(m.out_features * m.in_features for m in layers)
        ternary_bits = sum(8 * m.packed.numel() + 32 for m in layers)  # codes + one float32 scale each
        fp32_bytes = (tmp / "fp32" / "model.safetensors").stat().st_size
        packed_bytes = (tmp / "packed" / PACKED_FILE).stat().st_size
        warm = CognateForCausalLM(CognateModelConfig(vocab_size=args.vocab, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2)).eval()
        warm.save_pretrained(str(tmp / "warm-fp32"))
        replace_linears(warm)
        save_packed(warm, tmp / "warm-packed", args.format)
        fp32 = _measure("fp32", tmp / "fp32", tmp / "warm-fp32", args)
        packed = _measure("packed", tmp / "packed", tmp / "warm-packed", args)
        int8 = _measure("packed-int8", tmp / "packed", tmp / "warm-packed", args) if int8_kernel_available() else None

    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "model": {"params": params, "ternary_layers": len(layers), "ternary_weights": ternary_weights},
        "format": args.format,
        "ternary_bits_per_weight": ternary_bits / ternary_weights,
        "bytes_on_disk": {"fp32": fp32_bytes, "packed": packed_bytes},
        "size_ratio": fp32_bytes / packed_bytes,
        "ternary_layers_ratio": 32 * ternary_weights / ternary_bits,
        "fp32": fp32, "packed": packed, "packed_int8": int8,
        "peak_memory_ratio": fp32["peak_rss_growth_bytes"] / max(1, packed["peak_rss_growth_bytes"]),
        "latency_ratio_p50": packed["p50_ms"] / fp32["p50_ms"],
    }
    if int8:
        out["int8_peak_memory_ratio"] = fp32["peak_rss_growth_bytes"] / max(1, int8["peak_rss_growth_bytes"])
        out["int8_latency_ratio_p50"] = int8["p50_ms"] / fp32["p50_ms"]
    print(f"BitNet packed vs fp32: {out['command']}")
    print(f"{out['machine']}; model {params:,} params, {len(layers)} ternary layers ({ternary_weights:,} weights), "
          f"format {args.format}; batch {args.batch} x {args.seq} tokens, {args.repeats} timed forwards")
    print(f"ternary layers as stored: {out['ternary_bits_per_weight']:.3f} bits/weight "
          f"({out['ternary_layers_ratio']:.1f}x smaller than fp32)")
    print(f"{'model':11} {'bytes on disk':>14} {'peak RSS growth':>16} {'p50 ms':>8} {'p95 ms':>8}")
    rows = [("fp32", fp32, fp32_bytes), ("packed", packed, packed_bytes)]
    rows += [("packed-int8", int8, packed_bytes)] if int8 else []
    for name, m, size in rows:
        print(f"{name:11} {size:>14,} {m['peak_rss_growth_bytes']:>16,} {m['p50_ms']:>8.2f} {m['p95_ms']:>8.2f}")
    print(f"size {out['size_ratio']:.2f}x smaller; kernel decode: peak memory {out['peak_memory_ratio']:.2f}x lower, "
          f"latency {out['latency_ratio_p50']:.2f}x of fp32 (p50)")
    if int8:
        print(f"kernel int8: peak memory {out['int8_peak_memory_ratio']:.2f}x lower, "
              f"latency {out['int8_latency_ratio_p50']:.2f}x of fp32 (p50)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
