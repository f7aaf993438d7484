"""Phase 7's whole search in one process: what the ADAS team does across its nine agents, as a
plain loop (the benchmark and the tests run this; the team runs the same functions task by task).

:func:`evaluate_recipe` takes one recipe through every step (``evaluate.py``: architecture,
artifact, quality, speed; ``safety.check``; the evidence file) and returns its archive entry; a
recipe whose build or measurement raises is archived as infeasible with the error, never
dropped. :func:`run_search` measures the input model as the reference (fp32 eager, the profile's
most threads, batch 1), runs the generations (``search.propose``) and picks the winner
(``search.choose``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from phases.adas.config import AdasConfig
from phases.adas.evaluate import build_architecture, build_artifact, call_inputs, measure_quality, measure_speed
from phases.adas.profiles import TargetProfile
from phases.adas.recipes import Recipe, Space, build_space
from phases.adas.safety import check, reasons, write_evidence
from phases.adas.search import Archive, Candidate, choose, propose

__all__ = ["SearchOutcome", "choose_device", "evaluate_recipe", "reference_recipe", "run_search", "space_for"]


def choose_device(profile: TargetProfile) -> str:
    """The first of the profile's devices this machine has.

    Raises:
        ValueError: none is present (e.g. ``cloud-gpu`` without CUDA), naming them.
    """
    for d in profile.devices:
        if d == "cpu" or (d == "cuda" and torch.cuda.is_available()):
            return d
    raise ValueError(f"the profile runs on {list(profile.devices)}; this machine has none of them (no CUDA device)")


def space_for(profile: TargetProfile, cfg: AdasConfig, model: nn.Module, device: str) -> Space:
    """The recipe space ``profile`` allows for ``model`` on this machine (its backends narrowed to
    ``cfg.backends`` when set).

    Raises:
        ValueError: nothing the profile allows runs here, or ``cfg.backends`` leaves no backend.
    """
    import os

    from phases.adas.runtime import unsupported

    plain = len(model.model.layers) if hasattr(model, "model") and hasattr(model.model, "layers") else 0
    if cfg.backends is not None:
        allowed = tuple(b for b in profile.backends if b in cfg.backends)
        if not allowed:
            raise ValueError(f"adas.backends {list(cfg.backends)} leaves none of the profile's backends "
                             f"{list(profile.backends)}")
        profile = profile.model_copy(update={"backends": allowed})
    return build_space(profile, plain_layers=plain, max_drop=cfg.max_drop_layers, ffn_keep=tuple(cfg.ffn_keep),
                       low_rank=tuple(cfg.low_rank), max_threads=os.cpu_count() or 1, device=device,
                       unsupported=unsupported)


def reference_recipe(space: Space) -> Recipe:
    """The input model as it is: fp32, eager, the space's most threads, its smallest batch."""
    return Recipe(threads=max(space.threads), batch_size=min(space.batch_size))


def evaluate_recipe(model: nn.Module, recipe: Recipe, profile: TargetProfile, *, work_dir: Path,
                    calibration: torch.Tensor, windows: torch.Tensor, seq_len: int, device: str, cfg: AdasConfig,
                    reference_accuracy: float | None,
                    generation: int = 0, parents: tuple[str, ...] = (), origin: str = "seed",
                    tokenizer_from: str | Path | None = None) -> Candidate:
    """One recipe through every step (module docstring); its evidence goes to
    ``work_dir/evidence/<key>.json``."""
    evidence = work_dir / "evidence" / f"{recipe.key()}.json"
    cand = Candidate(recipe=recipe, generation=generation, parents=parents, origin=origin)
    speed = None
    try:
        arch = build_architecture(model, recipe, calibration, work_dir / "arch" / recipe.arch_key(), tokenizer_from)
        art = build_artifact(arch["dir"], recipe, work_dir / "artifacts" / recipe.key(), seq_len=seq_len,
                             device=device)
        call_ids, prompt_ids = call_inputs(windows[:, :-1], recipe, profile)
        quality = measure_quality(art["dir"], arch["dir"], windows, call_ids, reference_accuracy=reference_accuracy,
                                  batch_size=cfg.eval_batch_size)
        speed = measure_speed(art["dir"], call_ids, prompt_ids, profile.new_tokens, warmup=cfg.warmup,
                              repeats=cfg.repeats, token_repeats=cfg.token_repeats)
        cand.metrics = {"precision": recipe.precision, "backend": recipe.backend, "device": device,
                        "params": arch["params"], "flops_per_token": arch["flops_per_token"],
                        "dropped": arch["dropped"], "ffn_width": arch["ffn_width"], "ranks": len(arch["ranks"]),
                        "disk_bytes": art["disk_bytes"], **quality, **speed["metrics"]}
    except Exception as exc:  # any build or measurement failure makes the candidate infeasible, recorded
        cand.error = f"{type(exc).__name__}: {exc}"
    rows = check(profile, cand.metrics, evidence=f"evidence/{evidence.name}") if cand.error is None else []
    cand.passed = cand.error is None and all(r.passed for r in rows)
    cand.reasons = reasons(rows) if cand.error is None else [f"failed to build or measure: {cand.error}"]
    write_evidence(evidence, recipe=recipe, metrics=cand.metrics, speed=speed, requirements=rows)
    return cand


@dataclass
class SearchOutcome:
    profile: TargetProfile
    device: str
    space: Space
    reference: Candidate  # the input model, measured (not a search candidate)
    archive: Archive
    winner: int | None  # index into archive.candidates; None: no candidate met every requirement


def run_search(model: nn.Module, profile: TargetProfile, cfg: AdasConfig, *, work_dir: str | Path,
               calibration: torch.Tensor, windows: torch.Tensor, seed: int,
               tokenizer_from: str | Path | None = None) -> SearchOutcome:
    """The reference, ``cfg.generations`` x ``cfg.population`` candidates, and the winner.

    Args:
        model: the input model (fp32, eval).
        calibration: (N, T) training ids; windows: (N, T + 1) held-out ids.
    """
    work = Path(work_dir)
    device = choose_device(profile)
    space = space_for(profile, cfg, model, device)
    seq_len = int(windows.shape[1] - 1)
    common = dict(work_dir=work, calibration=calibration, windows=windows, seq_len=seq_len, device=device, cfg=cfg,
                  tokenizer_from=tokenizer_from)
    reference = evaluate_recipe(model, reference_recipe(space), profile, reference_accuracy=None, origin="reference",
                                **common)
    if reference.error is not None:
        raise RuntimeError(f"measuring the input model failed: {reference.error}")
    archive = Archive()
    for g in range(cfg.generations):
        for p in propose(archive, space, n=cfg.population, seed=seed, generation=g, decision=cfg.decision,
                         mutation_rate=cfg.mutation_rate):
            archive.add(evaluate_recipe(model, p.recipe, profile, reference_accuracy=reference.metrics["accuracy"],
                                        generation=g, parents=p.parents, origin=p.origin, **common))
    return SearchOutcome(profile, device, space, reference, archive, choose(archive, cfg.decision))
