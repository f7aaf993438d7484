"""Benchmark: the Quiet-STaR ablation, with and without thoughts, measured side by side in one run.

One start model, two training arms on the same batches for the same number of steps, then
the same held-out evaluation of every model:

- start model: a Cognate model of the tiny preset's shape (``configs/tiny.yaml``'s ``cognate:``),
  pre-trained here with ``phases.cognate.train.warmup`` for ``--pretrain-steps`` plain LM steps
  on the preset's corpus. It is written to ``--work`` and reused from there when it already
  exists (keyed by seed, steps, the Cognate config and the corpus), so reruns skip it.
- plain: the start LM trained ``--steps`` steps with next-token cross-entropy (no ponder term:
  the thought arm's loss has none either).
- thoughts: the start LM with the start/end-of-thought tokens (``add_thought_tokens``) in a
  ``ThoughtModel``, trained with ``ThoughtModel.loss`` (base NLL, talk NLL of the true tokens
  after each thought, REINFORCE) for the same steps, each step's thought sampling seeded from
  ``derived_seed(seed, f"bench/{step}")``.

Both arms: AdamW with ``phases.quietstar.train``'s parameter groups, learning-rate schedule
(linear warm-up, linear decay to 0) and gradient clipping, from one ``QuietStarConfig`` built
from the flags; deterministic kernels (``training_context``), ``--threads`` torch threads.
Every step's batch is one pure function of (seed, step): ``(B, L)`` rows, a ``--arith-share``
of them packed generated multi-step arithmetic (2-3 operations of +/- on 0..9, ``<eos>``
separated as ``pack_tasks`` packs tasks; the evaluation prompts are never generated), the rest
windows of the corpus' training text. The two arms' steps are interleaved (plain step s, then
thoughts step s), so both see the same machine load; time per step is the wall-clock
(``time.perf_counter``) of forward, backward, clipping and the optimizer step, mean and median.

Evaluation, the same for every model (start, plain, thoughts arm read without thoughts (its
``.lm``), thoughts arm with thoughts (the ``ThoughtModel``: thought-mixed predictions at the
positions its ``injection`` picks)): per-token NLL on ``--eval-windows`` held-out text windows;
"loss" is its mean, "hardest 10%" the mean over the 10% of tokens where the start model's NLL
is highest (``heldout_losses``); "2-step acc" is greedy exact match on ``--arith-tasks``
generated 2-operation problems (``multistep_arithmetic(seed + 1, ...)``, ``exact_match_accuracy``).
The differences are thoughts-with-thoughts minus plain, whichever way they go.

With ``--injection hard`` one more row reads the same trained thoughts arm thinking at every
position. At inference "hard" thinks where the base model's entropy is highest among the real
(non-pad) tokens of each row (``ThoughtModel.think``); training ranks by the base loss.

``--policy-weight`` defaults to 1, not the config's 1e6 (the reference's, for lr 1e-6 on a 7B
model): at ``--lr 1e-3`` a weight of 1e6 makes the REINFORCE term dominate the clipped gradient
and wrecks the LM (measured on 2026-11-26: held-out loss 1.54 -> 6.11 read without thoughts);
10 already costs loss, 0 and 1 do not (the README has the sweep).

Every number printed is computed in this run (the start model may come from an earlier run's
``--work`` dir). Measured on 2 shared CPU cores, 1 torch thread: the default run takes about
115 s (about 35 s of it pre-training the start model; about 75 s when it is reused); ``--quick``
(pretrain 100, 10 steps, 8 windows, 40 tasks) about 15 s.

Usage: python benchmarks/quietstar.py [--quick] [--work DIR] [--pretrain-steps 600] [--steps 100]
       [--batch-size 8] [--seq-len 64] [--arith-share 0.5] [--thought-length 6] [--n-thoughts 2]
       [--n-true 4] [--injection hard] [--hard-fraction 0.25] [--policy-weight 1] [--lr 1e-3]
       [--base-loss-weight 0.5] [--eval-windows 64] [--arith-tasks 200] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_ARITH_TAG = 0xA417  # the benchmark's arithmetic rows
_TEXT_TAG = 0x7E47  # the benchmark's text rows
QUICK = {"pretrain_steps": 100, "steps": 10, "eval_windows": 8, "arith_tasks": 40, "lr_warmup_steps": 2}


def _start_model(cfg, corpus, *, seed: int, steps: int, work: Path) -> tuple[Path, float, bool]:
    """The pre-trained start model dir: ``(dir, seconds spent, reused)``."""
    from phases.cognate.train import warmup

    ccfg = cfg.cognate.model_copy(update={"warmup_steps": steps})
    key = hashlib.sha256(json.dumps({"cognate": ccfg.model_dump(mode="json"), "corpus": corpus.fingerprint,
                                     "seed": seed}, sort_keys=True).encode()).hexdigest()[:12]
    out = work / f"start-s{seed}-p{steps}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out, 0.0, True
    t0 = time.perf_counter()
    warmup(ccfg, corpus, seed=seed, work_dir=work / f"ckpt-{out.name}", out_dir=out)
    return out, time.perf_counter() - t0, False


def make_batch_fn(corpus, *, seed: int, batch_size: int, seq_len: int, arith_share: float, exclude: frozenset[str]):
    """``batch(step) -> LongTensor (B, L)``: a pure function of (seed, step), the same for both arms.

    The first ``round(arith_share * B)`` rows are ``<eos> problem answer <eos> ...`` cut to L
    (row r of step s from ``SeedSequence([seed, tag, s, r])``, prompts in ``exclude`` skipped);
    the rest are corpus training windows (``Corpus.batch``, text only).
    """
    from phases.data import TaskMix
    from phases.quietstar.evaluate import arithmetic_problem
    from phases.training import derived_seed

    tok = corpus.tokenizer
    n_arith = round(arith_share * batch_size)
    text_mix = TaskMix(text=1.0, arithmetic=0.0, modular=0.0, tool=0.0)
    text_seed = derived_seed(seed, _TEXT_TAG)

    def batch(step: int) -> torch.Tensor:
        rows = []
        for r in range(n_arith):
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), _ARITH_TAG, int(step), r]))
            ids = [tok.eos_id]
            while len(ids) < seq_len:
                task = arithmetic_problem(rng, steps=int(rng.integers(2, 4)))  # 2 or 3 operations
                if task.prompt in exclude:
                    continue
                ids += tok.encode(task.prompt) + tok.encode(task.answer) + [tok.eos_id]
            rows.append(torch.tensor(ids[:seq_len], dtype=torch.long))
        out = torch.stack(rows) if rows else torch.empty(0, seq_len, dtype=torch.long)
        if batch_size - n_arith:
            text = corpus.batch(step, batch_size - n_arith, seq_len - 1, text_seed, mix=text_mix)  # (B', L)
            out = torch.cat([out, text])
        return out

    return batch


def _evaluate(name: str, model, windows, ref_nll, tokenizer, tasks) -> tuple[dict, torch.Tensor]:
    """Held-out losses (hardest tokens ranked by ``ref_nll``, or by the model's own NLL when
    None) and 2-step arithmetic accuracy: ``(row, per-token NLL)``."""
    from phases.quietstar.evaluate import exact_match_accuracy, heldout_losses, token_nll

    t0 = time.perf_counter()
    nll = token_nll(model, windows)
    row = {"model": name, **heldout_losses(nll, nll if ref_nll is None else ref_nll, hard_fraction=0.1),
           "arith_acc": exact_match_accuracy(model, tokenizer, tasks)}
    row["eval_s"] = time.perf_counter() - t0
    return row, nll


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "quietstar-bench",
                    help="where the start model is written and reused from (default: %(default)s)")
    ap.add_argument("--preset", default="tiny", help="the preset whose data and cognate sections are used")
    ap.add_argument("--seed", type=int, default=None, help="default: the preset's seed")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--arith-share", type=float, default=0.5, help="share of each batch's rows that are arithmetic")
    ap.add_argument("--thought-length", type=int, default=6, help="thought tokens without start/end (paper 8-ahead)")
    ap.add_argument("--n-thoughts", type=int, default=2)
    ap.add_argument("--n-true", type=int, default=4)
    ap.add_argument("--injection", choices=("all", "hard"), default="hard")
    ap.add_argument("--hard-fraction", type=float, default=0.25)
    ap.add_argument("--policy-weight", type=float, default=1.0,
                    help="weight of the REINFORCE term (the config's default 1e6 is for lr 1e-6)")
    ap.add_argument("--base-loss-weight", type=float, default=None, help="default: QuietStarConfig's")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr of both arms")
    ap.add_argument("--lr-warmup-steps", type=int, default=None, help="default: QuietStarConfig's")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--arith-tasks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write every number to this JSON file")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import phases.cognate.modeling  # noqa: F401 - registers Cognate with the Auto API (phases.cognate is lazy)
    from coordinator.config import load_config
    from phases.data import load_corpus
    from phases.quietstar.config import QuietStarConfig
    from phases.quietstar.evaluate import multistep_arithmetic
    from phases.quietstar.model import ThoughtModel, add_thought_tokens
    from phases.quietstar.train import lr_at, make_optimizer
    from phases.training import derived_seed, training_context

    cfg, _ = load_config(preset=args.preset, overrides=["wandb.mode=disabled"])
    seed = cfg.seed if args.seed is None else args.seed
    qs = {"thought_length": args.thought_length, "n_thoughts": args.n_thoughts, "n_true": args.n_true,
          "injection": args.injection, "hard_fraction": args.hard_fraction, "steps": args.steps,
          "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr}
    for flag in ("policy_weight", "base_loss_weight", "lr_warmup_steps"):
        if getattr(args, flag) is not None:
            qs[flag] = getattr(args, flag)
    qcfg = QuietStarConfig(**qs)
    corpus = load_corpus(cfg.data, seed)
    tasks = multistep_arithmetic(seed + 1, args.arith_tasks, steps=2)
    exclude = frozenset(t.prompt for t in tasks)
    batch = make_batch_fn(corpus, seed=seed, batch_size=args.batch_size, seq_len=args.seq_len,
                          arith_share=args.arith_share, exclude=exclude)
    windows = corpus.windows("heldout", args.seq_len, max_windows=args.eval_windows)  # (W, L + 1)
    dev = torch.device("cpu")

    out: dict = {"command": "python " + shlex.join(sys.argv),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": args.preset, "seed": seed,
                 "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "quietstar_config": qcfg.model_dump(mode="json")}
    with training_context(dev):
        start_dir, pre_s, reused = _start_model(cfg, corpus, seed=seed, steps=args.pretrain_steps, work=args.work)
        out["start_model"] = {"dir": str(start_dir), "pretrain_steps": args.pretrain_steps, "reused": reused,
                              "pretrain_s": pre_s}

        def load_lm():
            return AutoModelForCausalLM.from_pretrained(str(start_dir), dtype=torch.float32)

        start_lm = load_lm()
        plain = load_lm()
        lm = load_lm()
        hf_tok = AutoTokenizer.from_pretrained(str(start_dir))
        start_id, end_id = add_thought_tokens(lm, hf_tok, qcfg)
        # The mixing head's init seed as phase 3 derives it (train_quietstar's _load).
        thought = ThoughtModel(lm, qcfg, start_id=start_id, end_id=end_id,
                               init_seed=derived_seed(seed, "quietstar/init"))
        n_params = {"plain": sum(p.numel() for p in plain.parameters()),
                    "thoughts": sum(p.numel() for p in thought.parameters())}

        # -- training: the two arms interleaved step by step ------------------------------------
        opt_plain, opt_thought = make_optimizer(plain, qcfg), make_optimizer(thought, qcfg)
        times = {"plain": [], "thoughts": []}
        losses = {"plain": [], "thoughts": [], "thoughts_base_nll": [], "thoughts_talk_nll": [],
                  "thoughts_policy": [], "thoughts_reward": []}
        n_arith_tokens = 0
        plain.train()
        thought.train()
        for step in range(args.steps):
            x = batch(step)
            n_arith_tokens += round(args.arith_share * args.batch_size) * args.seq_len
            lr = lr_at(qcfg, step)
            for opt in (opt_plain, opt_thought):
                for group in opt.param_groups:
                    group["lr"] = lr

            t0 = time.perf_counter()
            logits = plain(input_ids=x[:, :-1]).logits
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt_plain.zero_grad(set_to_none=True)
            ce.backward()
            if qcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(plain.parameters(), qcfg.grad_clip, foreach=False)
            opt_plain.step()
            times["plain"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(derived_seed(seed, f"bench/{step}"))
            rollout = thought.loss(x, generator=gen)
            opt_thought.zero_grad(set_to_none=True)
            rollout.loss.backward()
            if qcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(thought.parameters(), qcfg.grad_clip, foreach=False)
            opt_thought.step()
            times["thoughts"].append(time.perf_counter() - t0)

            losses["plain"].append(float(ce.detach()))
            losses["thoughts"].append(float(rollout.loss.detach()))
            losses["thoughts_base_nll"].append(float(rollout.parts["base_nll"]))
            losses["thoughts_talk_nll"].append(float(rollout.parts["talk_nll"]))
            losses["thoughts_policy"].append(float(rollout.parts["policy_loss"]))
            losses["thoughts_reward"].append(float(rollout.parts["reward_mean"]))
            if not all(np.isfinite([ce.item(), rollout.loss.item()])):
                print(f"step {step}: a loss is not finite (plain {ce.item()}, thoughts {rollout.loss.item()})",
                      file=sys.stderr)
                return 1
        anchors_per_row = int(rollout.anchors.shape[1])

        # -- evaluation ----------------------------------------------------------------------------
        row, ref_nll = _evaluate("start", start_lm, windows, None, corpus.tokenizer, tasks)  # ranks the hard tokens
        rows = [row]
        evals = [("plain", plain), ("thoughts arm, no thoughts", thought.lm), ("thoughts arm, with thoughts", thought)]
        if qcfg.injection == "hard":
            # The same trained weights, thinking at every position at inference.
            every = ThoughtModel(thought.lm, qcfg.model_copy(update={"injection": "all"}), start_id=start_id,
                                 end_id=end_id)
            every.load_extra_state(thought.extra_state())
            evals.append(("thoughts arm, every position", every))
        for name, model in evals:
            rows.append(_evaluate(name, model, windows, ref_nll, corpus.tokenizer, tasks)[0])
    by = {r["model"]: r for r in rows}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    by["plain"]["s_per_step"], by["plain"]["s_per_step_median"] = mean["plain"], median["plain"]
    for name in ("thoughts arm, no thoughts", "thoughts arm, with thoughts", "thoughts arm, every position"):
        if name not in by:
            continue
        by[name]["s_per_step"], by[name]["s_per_step_median"] = mean["thoughts"], median["thoughts"]
    p, t = by["plain"], by["thoughts arm, with thoughts"]
    tail = max(1, min(10, args.steps))
    out.update({
        "rows": rows, "params": n_params, "anchors_per_row": anchors_per_row,
        "train_tokens_per_arm": args.steps * args.batch_size * args.seq_len, "arith_tokens_per_arm": n_arith_tokens,
        "step_times_s": times, "train_losses": losses,
        "train_loss_last": {k: statistics.fmean(v[-tail:]) for k, v in losses.items()},
        "difference_thoughts_minus_plain": {"loss": t["loss"] - p["loss"], "loss_hard": t["loss_hard"] - p["loss_hard"],
                                            "arith_acc": t["arith_acc"] - p["arith_acc"]},
        "difference_lm_only_minus_plain": {
            k: by["thoughts arm, no thoughts"][k] - p[k] for k in ("loss", "loss_hard", "arith_acc")},
        "difference_every_position_minus_plain": {
            k: by["thoughts arm, every position"][k] - p[k] for k in ("loss", "loss_hard", "arith_acc")}
        if "thoughts arm, every position" in by else None,
        "time_ratio_thoughts_over_plain": {"mean": mean["thoughts"] / mean["plain"],
                                           "median": median["thoughts"] / median["plain"]},
        "wall_s": time.perf_counter() - t_all,
    })

    print(f"Quiet-STaR ablation: {out['command']}")
    print(f"{out['machine']}; torch {torch.__version__}, {out['threads']} thread(s); preset {args.preset}, seed {seed}")
    sm = out["start_model"]
    print(f"start model: Cognate {n_params['plain']:,} params, {args.pretrain_steps} warm-up steps "
          + ("(reused from " + sm["dir"] + ")" if reused else f"(trained here in {pre_s:.1f} s -> {sm['dir']})"))
    print(f"training: {args.steps} steps x {args.batch_size} rows x {args.seq_len} tokens = "
          f"{out['train_tokens_per_arm']:,} tokens per arm, {args.arith_share:.0%} of rows multi-step arithmetic; "
          f"AdamW lr {qcfg.lr:g} (warm-up {qcfg.lr_warmup_steps}, linear decay), wd {qcfg.weight_decay:g}, "
          f"clip {qcfg.grad_clip:g}")
    print(f"thoughts: length {qcfg.thought_length} (+start/end), {qcfg.n_thoughts} per position, n_true {qcfg.n_true}, "
          f"injection {qcfg.injection}" + (f" ({qcfg.hard_fraction:g}: {anchors_per_row} positions/row)"
                                           if qcfg.injection == "hard" else f" ({anchors_per_row} positions/row)")
          + f", policy weight {qcfg.policy_weight:g}, base loss weight {qcfg.base_loss_weight:g}; "
          f"{n_params['thoughts'] - n_params['plain']:,} extra params")
    print(f"eval: {windows.shape[0]} held-out windows of {args.seq_len} tokens ({ref_nll.numel():,} tokens; "
          f"hardest 10% by the start model's NLL); {len(tasks)} 2-step arithmetic problems (never in training)")
    ll = out["train_loss_last"]
    print(f"train loss, mean of the last {tail} steps: plain CE {ll['plain']:.4f}; thoughts total {ll['thoughts']:.4f} "
          f"(base {ll['thoughts_base_nll']:.4f}, talk {ll['thoughts_talk_nll']:.4f}, "
          f"policy {ll['thoughts_policy']:.3g}, reward {ll['thoughts_reward']:.3g})")
    print()
    print(f"{'model':<31}{'held-out loss':>14}{'hardest 10%':>13}{'2-step acc':>12}{'s/step':>9}{'median':>9}")
    for r in rows:
        s = f"{r['s_per_step']:>9.3f}{r['s_per_step_median']:>9.3f}" if "s_per_step" in r else f"{'-':>9}{'-':>9}"
        print(f"{r['model']:<31}{r['loss']:>14.4f}{r['loss_hard']:>13.4f}{r['arith_acc']:>12.3f}{s}")
    d, dl = out["difference_thoughts_minus_plain"], out["difference_lm_only_minus_plain"]
    tr = out["time_ratio_thoughts_over_plain"]
    de = out["difference_every_position_minus_plain"]
    print()
    print(f"thoughts (with thoughts) - plain: loss {d['loss']:+.4f}, hardest 10% {d['loss_hard']:+.4f}, "
          f"2-step acc {d['arith_acc']:+.3f}  (negative loss / positive acc = thoughts better)")
    print(f"thoughts arm read without thoughts - plain: loss {dl['loss']:+.4f}, hardest 10% {dl['loss_hard']:+.4f}, "
          f"2-step acc {dl['arith_acc']:+.3f}")
    if de is not None:
        print(f"thoughts arm thinking at every position - plain: loss {de['loss']:+.4f}, hardest 10% "
              f"{de['loss_hard']:+.4f}, 2-step acc {de['arith_acc']:+.3f}")
    print(f"time per training step, thoughts / plain: {tr['mean']:.1f}x (mean), {tr['median']:.1f}x (median)")
    print(f"wall time {out['wall_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
