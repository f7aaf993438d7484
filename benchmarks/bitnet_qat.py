"""Benchmark: phase 4's choices, side by side in one run, on one input model.

Runs the whole phase (``phases.bitnet.train.train_bitnet``: calibration, quantization, QAT,
packed storage, reload and measurement) once per variant of the ``bitnet:`` section of a preset
(``--preset``, default tiny) on the same input model, corpus and seed:

- ``preset``: the preset's section as it is;
- ``absmean``: BitNet's absmean quantizer everywhere (``sparsity_thresholds: false``);
- ``subln``: with SubLN (the preset has it off);
- ``grokfast``: with the Grokfast EMA filter (alpha 0.98, lamb 2);
- ``no-qat``: quantized after calibration, no fine-tuning (``steps: 0``);
- ``2bit``: stored at 2 bits per weight instead of base 3.

Each row: held-out next-token accuracy retention vs the input model (before and after QAT),
perplexity, task accuracy (exact match, the preset's tasks per kind), ternary bits per weight
as stored, the whole-model size ratio (input ``*.safetensors`` bytes / ``bitnet.safetensors``),
sparsity, and the phase's wall time. Variants are what differs from ``preset``.

The input model: ``--model DIR`` (an HF causal LM dir, e.g. ``RUN/03_quietstar/models/quietstar``
of the tiny run). Every number printed is measured in this run.

Usage: python benchmarks/bitnet_qat.py --model DIR [--preset tiny] [--seed 1234]
       [--variants preset,absmean,...] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "preset": {},
    "absmean": {"sparsity_thresholds": False},
    "subln": {"sub_norm": True},
    "grokfast": {"grokfast": {"enabled": True}},
    "no-qat": {"steps": 0},
    "2bit": {"packing": "2bit"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="input HF causal LM dir")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=None, help="default: the preset's seed")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    import torch

    from coordinator.config import load_config
    from phases.bitnet.train import train_bitnet
    from phases.data import load_corpus

    torch.set_num_threads(args.threads)
    cfg, _ = load_config(preset=args.preset)
    seed = cfg.seed if args.seed is None else args.seed
    corpus = load_corpus(cfg.data, seed)
    base = cfg.bitnet.model_dump(mode="json")
    rows = {}
    for name in names:
        section = type(cfg.bitnet).model_validate({**base, **VARIANTS[name]})
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            out = train_bitnet(args.model, section, corpus, seed=seed, work_dir=tmp / "work", out_dir=tmp / "hf",
                               packed_dir=tmp / "packed")
            seconds = time.perf_counter() - t0
        m = out["metrics"]
        rows[name] = {"seconds": seconds, **{k.removeprefix("bitnet/"): v for k, v in m.items()
                                             if not k.startswith(("bitnet/speed", "bitnet/memory"))}}
        r = rows[name]
        nan = float("nan")
        print(f"{name:9} retention {r['accuracy_retention']:.3f} (before QAT {r['accuracy_retention_before_qat']:.3f}) "
              f"ppl {r['perplexity']:.3f} (input {r['perplexity_input']:.3f}) "
              f"tasks {r.get('task_accuracy', nan):.3f} (input {r.get('task_accuracy_input', nan):.3f}) "
              f"bits/w {r['ternary_bits_per_weight']:.3f} size {r['compression_ratio']:.2f}x "
              f"sparsity {r['sparsity_ratio']:.3f} {seconds:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), "seed": seed,
                                         "model": str(args.model), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
