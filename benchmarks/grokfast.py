"""Benchmark: Grokfast (arXiv 2405.20233) on the paper's algorithmic task, baseline vs EMA vs MA, side by side.

The acceptance benchmark of our Grokfast filters (``phases/forge/grokfast.py``, used as they are): the setup of the
reference ``main.py`` (ironjr/grokfast; ``../shared/reference/notes-algorithms.md`` section 2), where the paper
reports 39,890 steps to 95% validation accuracy for the baseline, 790 for Grokfast-MA (x50) and 910 for
Grokfast-EMA (x44).

- Task: modular MULTIPLICATION, all pairs x in [0, p), y in [1, p) (p = 97: 9,312 equations) as tokens
  [x, op, y, =] (op = p + 1, = is p) predicting c = x * y mod p; a seeded random 50/50 train/val split; loss and
  accuracy only on the last position's prediction (c).
- Model: the reference architecture as ``transformers.GPT2LMHeadModel`` (dim 128, 2 layers, 4 heads, 4x exact-GELU
  MLP, pre-LN, learned position embeddings, head without bias; 423,168 parameters), initialised as the reference's
  PyTorch modules are (``--init reference``; see ``build_model``).
- Optimizer: ``torch.optim.Adam`` (coupled L2 weight decay, as the reference), lr 1e-3, betas (0.9, 0.98), linear
  warmup over the first 10 updates. Each step trains on a batch of 512 drawn without replacement from the training
  set (numpy Generator seeded by ``--seed``; the reference instead iterates shuffled epochs of 10 batches, the last
  one of 48). Every variant starts from the same weights and sees the same batches.
- Variants: ``baseline`` (no filter, wd 0: the paper's baseline), ``ema`` (alpha 0.98, lamb 2, wd 0.005), ``ma``
  (window 100, lamb 5, wd 0.01): the README's reproduction commands; and the control ``baseline-wd`` (no filter,
  wd 0.01, the larger of the two Grokfast weight decays), which separates the filter's effect from the weight
  decay's.
- Measured per variant: steps to 95% val accuracy (the first evaluation at or above it; the whole val set every
  ``--eval-every`` steps, every ``--baseline-eval-every`` steps for the two long unfiltered runs), steps to 99% train
  accuracy (memorisation: accuracy on the training batches of the last eval interval, before their update, as the
  reference's running train accuracy), final train / val accuracy, wall seconds and seconds per step (evaluation
  included). A run stops once it has reached both, or at its cap. Ratios: baseline steps / Grokfast steps, against
  both baselines; a capped baseline gives a lower bound (">= N" steps, ">= r" ratio).

Fitted to a 2-core CPU: a step (batch 512) costs ~0.11 s on one core, so the paper's ~40k-step baseline (~75 min)
does not fit. The defaults keep p = 97 and cap the baseline at 11,000 steps (``--baseline-cap``) and the control at
7,000 (``--control-cap``), and report lower bounds; the four runs go two at a time in worker processes of one
thread each (``--jobs 2 --threads 1``: on 2 cores this is nearly twice the throughput of one run on 2 threads, and
2 threads thrash when anything else is running). A step costs ~0.11 s on an idle core (0.22 s while other jobs
shared the machine, as in the default run below, which took 40 min).

Result of the default run (seed 0, this machine): baseline memorises by step 400 (train 99%) but its val accuracy is
0.643 at the 11,000-step cap (>= 11000); EMA reaches 95% val at step 930 (paper 910), MA at 1,070 (paper 790):
>= 11.8x and >= 10.3x fewer steps, target (>= 10x) met. The control (wd 0.01, no filter) stays at chance (loss
ln 97) for all 7,000 steps (presumably the coupled L2 term outweighs the small early gradients in Adam's update,
and the filter's amplified gradients overcome it), so the speed-up is the filter's, not the weight decay's. With
GPT-2's own N(0, 0.02) init (``--init gpt2``) EMA took 670 steps but memorised and generalised at the same step (no
grokking delay to speed up), hence the reference init.

Usage: python benchmarks/grokfast.py [--prime 97] [--seed 0] [--baseline-cap 11000] [--control-cap 7000]
       [--steps 3000] [--eval-every 10] [--baseline-eval-every 100] [--variants baseline,ema,ma,baseline-wd]
       [--jobs 2] [--threads 1] [--log-every 1000] [--json PATH]

Prints one line per run as it finishes, then a table (variant, config, steps to 95% val, steps to 99% train,
final train / val accuracy, wall s, s/step), the speed-ups against ``baseline`` and ``baseline-wd``, and a SUMMARY
line saying whether Grokfast took at least 10x fewer steps than the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F

from phases.forge.grokfast import GrokfastConfig, make_filter

VAL_TARGET = 0.95  # the paper's "iterations to 95% validation accuracy"
TRAIN_TARGET = 0.99  # memorisation


@dataclass
class Variant:
    name: str
    weight_decay: float
    grokfast: GrokfastConfig = field(default_factory=GrokfastConfig)  # disabled by default
    baseline: bool = False  # no filter: capped by --baseline-cap / --control-cap, evaluated less often

    def describe(self) -> str:
        g = self.grokfast
        if not g.enabled:
            filt = "no filter"
        elif g.filter == "ema":
            filt = f"EMA alpha {g.alpha:g} lamb {g.amplification:g}"
        else:
            filt = f"MA window {g.window} lamb {g.amplification:g}"
        return f"{filt}, wd {self.weight_decay:g}"


def make_variants(args: argparse.Namespace) -> dict[str, Variant]:
    ema = GrokfastConfig(enabled=True, filter="ema", alpha=args.ema_alpha, lamb=args.ema_lamb)
    ma = GrokfastConfig(enabled=True, filter="ma", window=args.ma_window, lamb=args.ma_lamb)
    return {
        "baseline": Variant("baseline", 0.0, baseline=True),  # the paper's baseline (wd 0)
        "baseline-wd": Variant("baseline-wd", args.control_wd, baseline=True),  # control: the wd, no filter
        "ema": Variant("ema", args.ema_wd, ema),
        "ma": Variant("ma", args.ma_wd, ma),
    }


def make_data(p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All equations x * y = c (mod p), x in [0, p), y in [1, p), as tokens [x, op, y, =] -> c, split 50/50
    at random (seeded): (train inputs, train targets, val inputs, val targets)."""
    eq_token, op_token = p, p + 1
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).T
    inputs = torch.stack([x, torch.full_like(x, op_token), y, torch.full_like(x, eq_token)], dim=1)
    targets = x * y % p
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(targets)))
    train, val = perm[: len(perm) // 2], perm[len(perm) // 2:]
    return inputs[train], targets[train], inputs[val], targets[val]


def build_model(p: int, init: str) -> torch.nn.Module:
    """The reference architecture (ironjr/grokfast ``main.py`` ``Decoder``): causal decoder, dim 128, 2 layers,
    4 heads, 4x MLP with exact GELU, pre-LN blocks and a final LayerNorm, learned position embeddings, head without
    bias; GPT-2 is exactly that (423,168 parameters at p = 97). One quirk of the reference block is not copied: it
    adds the attention output to ``ln_1(x)`` instead of ``x``; here the residual stream is the standard one.

    ``init``: "reference" re-initialises every weight as PyTorch's defaults for the reference's modules do
    (``nn.Embedding`` N(0, 1); ``nn.MultiheadAttention`` in-projection Xavier-uniform with zero bias, output
    projection U(+-1/sqrt(fan_in)) with zero bias; ``nn.Linear`` U(+-1/sqrt(fan_in)) for weight and bias); "gpt2"
    keeps GPT-2's N(0, 0.02)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=p + 2, n_positions=8, n_embd=128, n_layer=2, n_head=4, activation_function="gelu",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # "eager" attention: faster than sdpa for these 4-token sequences on CPU (measured), and deterministic
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    if init == "reference":
        _reference_init(model)
    return model


@torch.no_grad()
def _reference_init(model: torch.nn.Module) -> None:
    def uniform(t: torch.Tensor, fan_in: int) -> None:
        bound = 1.0 / math.sqrt(fan_in)
        t.uniform_(-bound, bound)

    tr = model.transformer
    d = tr.wte.weight.shape[1]
    tr.wte.weight.normal_()
    tr.wpe.weight.normal_()
    for block in tr.h:
        # GPT-2's Conv1D stores weights as (in, out); xavier_uniform is symmetric in fan_in / fan_out
        torch.nn.init.xavier_uniform_(block.attn.c_attn.weight)
        block.attn.c_attn.bias.zero_()
        uniform(block.attn.c_proj.weight, d)
        block.attn.c_proj.bias.zero_()
        uniform(block.mlp.c_fc.weight, d)
        uniform(block.mlp.c_fc.bias, d)
        uniform(block.mlp.c_proj.weight, 4 * d)
        uniform(block.mlp.c_proj.bias, 4 * d)
        for ln in (block.ln_1, block.ln_2):
            ln.reset_parameters()
    tr.ln_f.reset_parameters()
    uniform(model.lm_head.weight, d)


def last_logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs, logits_to_keep=1, use_cache=False).logits[:, -1]


@torch.inference_mode()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> float:
    model.eval()
    correct = sum(int((last_logits(model, x).argmax(-1) == y).sum()) for x, y in
                  zip(inputs.split(chunk), targets.split(chunk)))
    model.train()
    return correct / len(targets)


def run_variant(v: Variant, init_state: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...],
                args: argparse.Namespace) -> dict:
    """Train one variant from the shared initial weights until 95% val accuracy (and 99% train accuracy) or its
    step cap; evaluate the whole validation set every ``eval_every`` steps. Runs in a worker process."""
    torch.set_num_threads(args.threads)
    cap = (args.control_cap if v.weight_decay else args.baseline_cap) if v.baseline else args.steps
    eval_every = args.baseline_eval_every if v.baseline else args.eval_every
    x_tr, y_tr, x_va, y_va = data
    model = build_model(args.prime, "gpt2")
    model.load_state_dict(init_state)
    model.train()
    # torch.optim.Adam: coupled L2 weight decay, as the reference
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=v.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 if u > 10 else u / 10)  # the reference's warmup
    filt = make_filter(v.grokfast)
    rng = np.random.default_rng(args.seed + 1)  # same batch sequence for every variant
    n_train = len(y_tr)
    step, hit_val, hit_train = 0, None, None
    correct = seen = 0
    curve: list[tuple[int, float, float]] = []
    train_acc = val_acc = 0.0
    t0 = time.perf_counter()
    while step < cap:
        idx = torch.from_numpy(rng.choice(n_train, size=min(args.batch_size, n_train), replace=False))
        x, y = x_tr[idx], y_tr[idx]
        logits = last_logits(model, x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if filt is not None:
            filt.apply(model)
        opt.step()
        sched.step()
        step += 1
        correct += int((logits.detach().argmax(-1) == y).sum())
        seen += len(y)
        if step % eval_every == 0 or step == cap:
            # train accuracy: on the batches of this interval, before their update (as the reference's per-epoch
            # running train accuracy); val accuracy: the whole validation set
            train_acc, correct, seen = correct / seen, 0, 0
            val_acc = accuracy(model, x_va, y_va)
            curve.append((step, round(train_acc, 4), round(val_acc, 4)))
            if hit_train is None and train_acc >= TRAIN_TARGET:
                hit_train = step
            if hit_val is None and val_acc >= VAL_TARGET:
                hit_val = step
            if args.log_every and step % args.log_every < eval_every:
                print(f"  [{v.name}] step {step:6d} loss {loss.item():.4f} train {train_acc:.3f} val {val_acc:.3f} "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            if hit_val is not None and hit_train is not None:
                break
    seconds = time.perf_counter() - t0
    return {"variant": v.name, "config": v.describe(), "weight_decay": v.weight_decay,
            "grokfast": v.grokfast.model_dump(mode="json"), "cap": cap, "eval_every": eval_every, "steps_run": step,
            "steps_to_val95": hit_val, "steps_to_train99": hit_train, "final_train_acc": train_acc,
            "final_val_acc": val_acc, "seconds": seconds, "seconds_per_step": seconds / step, "curve": curve}


def fmt_steps(r: dict, key: str) -> str:
    return str(r[key]) if r[key] is not None else f">= {r['steps_run']}"


def ratio(base: dict, fast: dict) -> tuple[float | None, bool]:
    """base steps / fast steps and whether it is a lower bound (the baseline was capped); None when the fast run
    never reached the target (no ratio can be claimed)."""
    if fast["steps_to_val95"] is None:
        return None, False
    if base["steps_to_val95"] is None:
        return base["steps_run"] / fast["steps_to_val95"], True
    return base["steps_to_val95"] / fast["steps_to_val95"], False


def fmt_ratio(r: tuple[float | None, bool]) -> str:
    value, lower = r
    if value is None:
        return "n/a (did not reach 95%)"
    return f"{'>= ' if lower else ''}{value:.1f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prime", type=int, default=97)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000, help="step cap of the Grokfast runs")
    ap.add_argument("--baseline-cap", type=int, default=11000, help="step cap of the baseline")
    ap.add_argument("--control-cap", type=int, default=7000, help="step cap of the baseline-wd control")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between evaluations of the whole val set")
    ap.add_argument("--baseline-eval-every", type=int, default=100, help="the same, for baseline and baseline-wd")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=["reference", "gpt2"], default="reference")
    ap.add_argument("--ema-alpha", type=float, default=0.98)
    ap.add_argument("--ema-lamb", type=float, default=2.0)
    ap.add_argument("--ema-wd", type=float, default=0.005)
    ap.add_argument("--ma-window", type=int, default=100)
    ap.add_argument("--ma-lamb", type=float, default=5.0)
    ap.add_argument("--ma-wd", type=float, default=0.01)
    ap.add_argument("--control-wd", type=float, default=0.01, help="weight decay of the baseline-wd control")
    ap.add_argument("--variants", default="baseline,ema,ma,baseline-wd", help="run (started) in this order")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (worker processes)")
    ap.add_argument("--log-every", type=int, default=1000, help="print progress every N steps (0: off)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    variants = make_variants(args)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in variants]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(variants)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = make_data(args.prime, args.seed)
    model = build_model(args.prime, args.init)
    init_state = {k: t.clone() for k, t in model.state_dict().items()}
    n_params = sum(t.numel() for t in model.parameters())
    print(f"modular multiplication p={args.prime}: {len(data[1])} train / {len(data[3])} val equations; "
          f"GPT-2 decoder {n_params:,} params ({args.init} init); Adam lr {args.lr:g} betas (0.9, 0.98), "
          f"batch {args.batch_size}, seed {args.seed}; eval every {args.eval_every} steps "
          f"({args.baseline_eval_every} unfiltered); {args.jobs} jobs x {args.threads} threads", flush=True)

    rows: dict[str, dict] = {}
    # one worker process per concurrent run (spawn: no fork of an initialised OpenMP runtime); each run is
    # independent and deterministic, so --jobs changes the wall time only
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_variant, variants[n], init_state, data, args): n for n in names}
        for fut in as_completed(futures):
            r = fut.result()
            rows[r["variant"]] = r
            print(f"{r['variant']:11} ({r['config']}): val95 {fmt_steps(r, 'steps_to_val95')} train99 "
                  f"{fmt_steps(r, 'steps_to_train99')} final train {r['final_train_acc']:.3f} "
                  f"val {r['final_val_acc']:.3f} {r['seconds']:.0f} s ({r['seconds_per_step']:.3f} s/step)", flush=True)
    rows = {n: rows[n] for n in names}

    print()
    print(f"{'variant':11} | {'config':32} | {'steps->95% val':>14} | {'steps->99% train':>16} | "
          f"{'train':>5} | {'val':>5} | {'wall s':>6} | {'s/step':>6}")
    print("-" * 118)
    for name, r in rows.items():
        print(f"{name:11} | {r['config']:32} | {fmt_steps(r, 'steps_to_val95'):>14} | "
              f"{fmt_steps(r, 'steps_to_train99'):>16} | {r['final_train_acc']:5.3f} | {r['final_val_acc']:5.3f} | "
              f"{r['seconds']:6.0f} | {r['seconds_per_step']:6.3f}")

    ratios: dict[str, dict] = {}
    for base in ("baseline", "baseline-wd"):
        for fast in ("ema", "ma"):
            if base in rows and fast in rows:
                value, lower = ratio(rows[base], rows[fast])
                ratios[f"{base}/{fast}"] = {"ratio": value, "lower_bound": lower}
                print(f"steps to 95% val acc, {base} / {fast}: {fmt_ratio((value, lower))}")
    main_ratios = [ratios[k] for k in ("baseline/ema", "baseline/ma") if k in ratios]
    met = bool(main_ratios) and all(r["ratio"] is not None and r["ratio"] >= 10 for r in main_ratios)
    parts = [f"{n} {fmt_steps(r, 'steps_to_val95')}" for n, r in rows.items()]
    for k, r in ratios.items():
        parts.append(f"{k} {fmt_ratio((r['ratio'], r['lower_bound']))}")
    print(f"SUMMARY (p={args.prime}, steps to 95% val acc): {'; '.join(parts)}; target Grokfast >= 10x fewer steps "
          f"than the baseline: {'MET' if met else 'NOT MET'} (paper, p=97: 39,890 / 910 EMA = x44, / 790 MA = x50)")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args) | {"json": str(args.json)},
            "params": n_params, "rows": rows, "ratios": ratios, "target_met": met}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
