"""The nine agents of phase 7's ADAS team: thin shells over ``phases/adas/``.

Each role handles the tasks of the orchestrator's graph (:mod:`actors.adas.graph`). A task's
payload carries the shared settings (``input`` model dir, ``work`` dir, ``out`` model dir,
``deploy`` and ``certificate`` dirs, ``data``, ``seed``, ``cfg`` = the ``adas:`` section); its
output is small plain data (recipes, paths, measured numbers). Every file a task writes is named
after a recipe's hash and written atomically; a finished build or measurement found on disk is
reused, so a task replayed after a kill gives the same outputs. The roles keep no state between
tasks, so a restarted agent needs no checkpoint.

| role | tasks | what it does |
|---|---|---|
| adas-orchestrator | plan, report | profile, device and recipe space; the phase's report |
| architecture-proposer | propose-g | new recipes from the archive and its Pareto front |
| candidate-builder | build-g | each recipe's architecture (HF dir) and deployed artifact |
| evaluator | evaluate-g | held-out accuracy; parity vs the fp32 eager twin |
| latency-profiler | profile-g | p50/p95/p99 per call and per token, peak memory |
| safety-monitor | safety-g | every requirement of the profile: pass, or the reasons |
| archivist | archive-g | the archive, lineage, Pareto front and current winner |
| edge-deployer | deploy | exports the winner, reloads it, checks parity |
| compliance-validator | certify | the certificate, or which requirements nobody met |
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from actors.io import corpus_for, load_hf, set_threads
from actors.roles import StatelessRole
from coordinator.errors import PhaseError
from serialization.checkpoint import atomic_write_json

__all__ = ["ADASOrchestrator", "Archivist", "ArchitectureProposer", "CandidateBuilder", "ComplianceValidator",
           "EdgeDeployer", "Evaluator", "LatencyProfiler", "SafetyMonitor"]

SIDE_FILES = ("tools.json", "knowledge.json", "persona.json")  # phase 6's package, carried to phase 8


class _AdasRole(StatelessRole):
    """Imports the heavy libraries when the actor starts (``config["warm"]``: the roles that load
    models), so their imports overlap instead of delaying each first task in turn. The roles that
    only handle plain data (proposer, safety monitor, archivist) never import torch or
    transformers (``actors.io`` imports them inside its functions)."""

    def setup(self, context: Any) -> None:
        if context.config.get("warm", True):
            import transformers  # noqa: F401

            import phases.cognate.modeling  # noqa: F401
            import phases.data.corpus  # noqa: F401
            set_threads()


def _cfg(payload: dict[str, Any]):
    from phases.adas.config import AdasConfig

    return AdasConfig(**payload["cfg"])


def _generation(task: str) -> int:
    return int(task.rsplit("-", 1)[1])


def _profile(plan: dict[str, Any]):
    from phases.adas.profiles import TargetProfile

    return TargetProfile(**plan["profile_json"])


def _windows(payload: dict[str, Any]):
    """Held-out windows (N, T + 1): accuracy, the timed inputs."""
    cfg = payload["cfg"]
    return corpus_for(payload).windows("heldout", max_windows=int(cfg["eval_batch_size"]) * int(cfg["eval_batches"]))


def _calibration(payload: dict[str, Any]):
    """Training ids (N, T): Block Influence and the FFN neuron scores."""
    corpus = corpus_for(payload)
    return corpus.batch(0, int(payload["cfg"]["calibration_windows"]), corpus.config.seq_len,
                        int(payload["seed"]))[:, :-1]


def _recipe(entry: dict[str, Any]):
    from phases.adas.recipes import Recipe

    return Recipe.from_json(entry["recipe"])


def _ok(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if not i.get("error")]


# ------------------------------------------------------------------------------- orchestrator

class ADASOrchestrator(_AdasRole):
    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        if task == "plan":
            return self._plan(payload)
        if task == "report":
            return self._report(payload, inputs)
        raise ValueError(f"adas-orchestrator has no task {task!r} (plan, report)")

    def _plan(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The profile, the device it runs on here, the recipe space and the reference recipe."""
        from phases.adas.inline import choose_device, reference_recipe, space_for

        cfg = _cfg(payload)
        profile = cfg.target()
        try:
            device = choose_device(profile)
            space = space_for(profile, cfg, load_hf(payload["input"]), device)
        except ValueError as err:
            raise PhaseError("adas", f"profile {cfg.profile!r} cannot run here: {err}") from None
        plan = {"profile": cfg.profile, "profile_json": profile.model_dump(mode="json"), "device": device,
                "space": space.to_json(), "seq_len": int(corpus_for(payload).config.seq_len),
                "reference": reference_recipe(space).to_json()}
        atomic_write_json(Path(payload["work"]) / "plan.json", plan)
        return plan

    def _report(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """``adas_report.json``: the search as functions of the config and seed (recipes, lineage,
        accuracy, bytes, FLOPs); the timings and the verdicts taken on them go to ``timings.json``."""
        archive, plan = inputs[last_archive(inputs)], inputs["plan"]
        keep = ("accuracy", "retention", "disk_bytes", "flops_per_token", "params", "parity", "argmax_agreement")
        report = {"profile": plan["profile"], "device": plan["device"], "space": plan["space"],
                  "reference": {k: inputs["safety-0"]["reference"]["metrics"].get(k) for k in keep},
                  "candidates": [{"key": c["key"], "recipe": c["recipe"], "generation": c["generation"],
                                  "parents": c["parents"], "origin": c["origin"], "error": c["error"],
                                  **{k: c["metrics"].get(k) for k in keep}} for c in archive["archive"]]}
        timings = {"reference": inputs["safety-0"]["reference"], "archive": archive["archive"],
                   "front": archive["front"], "winner": archive["winner"], "deploy": inputs["deploy"],
                   "certify": inputs["certify"]}
        d = Path(payload["work"]) / "report"
        atomic_write_json(d / "adas_report.json", report)
        atomic_write_json(d / "timings.json", timings)
        return {"report": str(d / "adas_report.json"), "timings": str(d / "timings.json")}


def last_archive(inputs: dict[str, Any]) -> str:
    """The name of the last generation's archive task among a task's inputs (or the team's outputs)."""
    return max((k for k in inputs if k.startswith("archive-")), key=_generation)


# ------------------------------------------------------------------------------- proposer, builder

class ArchitectureProposer(_AdasRole):
    """``propose-g``: new recipes bred from the archive and its Pareto front (``search.propose``);
    generation 0 also lists the reference (the input model as it is)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.recipes import Space
        from phases.adas.search import Archive, propose

        g, cfg, plan = _generation(task), _cfg(payload), inputs["plan"]
        archive = Archive.from_json(inputs[f"archive-{g - 1}"]["archive"]) if g else Archive()
        out = [{"recipe": p.recipe.to_json(), "key": p.recipe.key(), "parents": list(p.parents), "origin": p.origin}
               for p in propose(archive, Space.from_json(plan["space"]), n=cfg.population, seed=int(payload["seed"]),
                                generation=g, decision=cfg.decision, mutation_rate=cfg.mutation_rate)]
        reference = None
        if g == 0:
            from phases.adas.recipes import Recipe

            ref = Recipe.from_json(plan["reference"])
            reference = {"recipe": ref.to_json(), "key": ref.key(), "parents": [], "origin": "reference"}
        return {"proposals": out, "reference": reference}


class CandidateBuilder(_AdasRole):
    """``build-g``: each recipe's architecture (``work/arch/<arch>``, shared by recipes with the
    same architecture genes) and deployed artifact (``work/artifacts/<key>``); a recipe that
    fails to build is reported with its error (it is archived infeasible, not dropped)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.evaluate import build_architecture, build_artifact

        set_threads()
        plan, proposed = inputs["plan"], inputs[f"propose-{_generation(task)}"]
        work = Path(payload["work"])
        model = load_hf(payload["input"])
        calibration = _calibration(payload)
        items = ([proposed["reference"]] if proposed["reference"] else []) + proposed["proposals"]
        built = []
        for item in items:
            recipe = _recipe(item)
            entry = dict(item)
            try:
                arch = build_architecture(model, recipe, calibration, work / "arch" / recipe.arch_key(),
                                          payload["input"])
                art = build_artifact(arch["dir"], recipe, work / "artifacts" / recipe.key(),
                                     seq_len=int(plan["seq_len"]), device=plan["device"])
                entry.update(arch_dir=arch["dir"], artifact_dir=art["dir"], disk_bytes=art["disk_bytes"],
                             params=arch["params"], flops_per_token=arch["flops_per_token"],
                             dropped=arch["dropped"], ffn_width=arch["ffn_width"], ranks=len(arch["ranks"]))
            except Exception as exc:  # recorded: the candidate is infeasible
                entry["error"] = f"build: {type(exc).__name__}: {exc}"
            built.append(entry)
        return {"built": built}


# ------------------------------------------------------------------------------- evaluator, profiler

class Evaluator(_AdasRole):
    """``evaluate-g``: held-out accuracy of each artifact and its parity vs the fp32 eager twin
    (``evaluate.measure_quality``)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.evaluate import call_inputs, measure_quality

        set_threads()
        profile = _profile(inputs["plan"])
        windows = _windows(payload)
        out = {}
        for entry in _ok(inputs[f"build-{_generation(task)}"]["built"]):
            if entry["key"] in out:  # the reference is also generation 0's seed recipe
                continue
            call_ids, _ = call_inputs(windows[:, :-1], _recipe(entry), profile)
            try:
                out[entry["key"]] = measure_quality(entry["artifact_dir"], entry["arch_dir"], windows, call_ids,
                                                    reference_accuracy=None,
                                                    batch_size=int(payload["cfg"]["eval_batch_size"]))
            except Exception as exc:  # recorded: the candidate is infeasible
                out[entry["key"]] = {"error": f"evaluate: {type(exc).__name__}: {exc}"}
        return {"quality": out}


class LatencyProfiler(_AdasRole):
    """``profile-g``: peak memory, call and per-token latency of each artifact on the target
    backend with the recipe's threads (``evaluate.measure_speed``), while no other agent computes.
    Each measurement is stored under ``work/speed/<key>.json`` and reused when the task replays
    (DESIGN, "Determinism": measurements are kept per candidate hash)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.evaluate import call_inputs, measure_speed

        cfg, profile = _cfg(payload), _profile(inputs["plan"])
        windows = _windows(payload)
        quality = inputs[f"evaluate-{_generation(task)}"]["quality"]
        d = Path(payload["work"]) / "speed"
        out = {}
        for entry in _ok(inputs[f"build-{_generation(task)}"]["built"]):
            key = entry["key"]
            if quality.get(key, {}).get("error"):
                continue
            path = d / f"{key}.json"
            if path.is_file():
                out[key] = {"file": str(path)}
                continue
            call_ids, prompt_ids = call_inputs(windows[:, :-1], _recipe(entry), profile)
            try:
                speed = measure_speed(entry["artifact_dir"], call_ids, prompt_ids, profile.new_tokens,
                                      warmup=cfg.warmup, repeats=cfg.repeats, token_repeats=cfg.token_repeats)
            except Exception as exc:  # recorded: the candidate is infeasible
                speed = {"error": f"profile: {type(exc).__name__}: {exc}"}
            atomic_write_json(path, speed)
            out[key] = {"file": str(path)}
        return {"speed": out}


# ------------------------------------------------------------------------------- safety, archive

class SafetyMonitor(_AdasRole):
    """``safety-g``: every requirement of the profile against each candidate's measurements
    (``safety.check``); writes each candidate's evidence file (``work/evidence/<key>.json``).
    Generation 0 also measures the reference's retention base (the input model's accuracy)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.safety import check, reasons, retention, write_evidence

        g = _generation(task)
        profile = _profile(inputs["plan"])
        quality, speed = inputs[f"evaluate-{g}"]["quality"], inputs[f"profile-{g}"]["speed"]
        reference = inputs["safety-0"]["reference"] if g else None
        out, ref_out = [], None
        # generation 0 lists the reference first: every retention is relative to its accuracy
        for entry in inputs[f"build-{g}"]["built"]:
            recipe, key, is_ref = _recipe(entry), entry["key"], entry["origin"] == "reference"
            error = entry.get("error") or quality.get(key, {}).get("error")
            sp: dict[str, Any] = {}
            if not error and key in speed:
                sp = json.loads(Path(speed[key]["file"]).read_text())
                error = sp.get("error")
            metrics: dict[str, Any] = {}
            if not error:
                base = None if is_ref else reference["metrics"]["accuracy"]
                q = dict(quality[key])
                q["retention"] = None if base is None else retention(q["accuracy"], base)
                metrics = {"precision": recipe.precision, "backend": recipe.backend,
                           **{k: entry[k] for k in ("params", "flops_per_token", "dropped", "ffn_width", "ranks",
                                                    "disk_bytes")}, **q, **sp["metrics"]}
            rows = check(profile, metrics, evidence=f"evidence/{key}.json") if not error and not is_ref else []
            path = evidence_file(payload, f"{key}.reference" if is_ref else key)
            write_evidence(path, recipe=recipe, metrics=metrics, speed=sp or None, requirements=rows)
            result = {"key": key, "recipe": entry["recipe"], "parents": entry["parents"], "origin": entry["origin"],
                      "generation": g, "metrics": metrics, "error": error,
                      "passed": not error and all(r.passed for r in rows),
                      "reasons": reasons(rows) if not error else [f"failed to build or measure: {error}"],
                      "evidence": str(path)}
            if is_ref:
                if error:
                    raise PhaseError("adas", f"measuring the input model failed: {error}")
                ref_out = reference = result
            else:
                out.append(result)
        return {"checked": out, "reference": ref_out}


class Archivist(_AdasRole):
    """``archive-g``: adds the generation's candidates (recipe, lineage, measurements, verdict)
    to the archive, and records the Pareto front and the current winner (``search.choose``);
    ``work/archive/archive-g.json`` holds it."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.search import Archive, Candidate, choose

        g, cfg = _generation(task), _cfg(payload)
        archive = Archive.from_json(inputs[f"archive-{g - 1}"]["archive"]) if g else Archive()
        for c in inputs[f"safety-{g}"]["checked"]:
            archive.add(Candidate.from_json({**c, "error": c["error"] or None}))
        front = archive.front(cfg.decision)
        winner = choose(archive, cfg.decision)
        path = Path(payload["work"]) / "archive" / f"archive-{g}.json"
        atomic_write_json(path, {"archive": archive.to_json(), "front": front, "winner": winner})
        return {"archive": archive.to_json(), "front": front, "front_passed": archive.front(cfg.decision,
                                                                                               passed_only=True),
                "winner": winner, "file": str(path)}


# ------------------------------------------------------------------------------- deployer, validator

class EdgeDeployer(_AdasRole):
    """``deploy``: the winner's artifact copied to the deployment dir and its architecture (an
    HF model dir with the input's tokenizer and phase 6's tool registry and persona) to the
    phase's model dir; the deployed artifact reloaded from its new place and run: its logits
    must equal the measured artifact's, and its parity vs the fp32 eager twin is measured again
    on held-out inputs the search never timed."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import torch

        from phases.adas.evaluate import load_architecture
        from phases.adas.measure import parity
        from phases.adas.runtime import load_runner
        from serialization.checkpoint import publish_dir, staging_dir

        set_threads()
        archive = inputs[last_archive(inputs)]
        if archive["winner"] is None:
            return {"deployed": False}
        winner = archive["archive"][archive["winner"]]
        work = Path(payload["work"])
        src_art, src_arch = work / "artifacts" / winner["key"], work / "arch" / _arch(winner)
        deployed, model_dir = Path(payload["deploy"]), Path(payload["out"])
        for src, dst, extra in ((src_art, deployed, False), (src_arch, model_dir, True)):
            tmp = staging_dir(dst)
            shutil.copytree(src, tmp)
            if extra:
                for name in SIDE_FILES:
                    if (Path(payload["input"]) / name).is_file():
                        shutil.copy2(Path(payload["input"]) / name, tmp / name)
            publish_dir(tmp, dst)
        windows = _windows(payload)
        ids = windows[-min(2, windows.shape[0]):, : _profile(inputs["plan"]).call_tokens]  # last rows: never timed
        reloaded, measured = load_runner(deployed), load_runner(src_art)
        same = bool(torch.equal(reloaded.logits(ids), measured.logits(ids)))
        with torch.no_grad():
            twin = load_architecture(model_dir)(input_ids=ids).logits.float()
        return {"deployed": True, "key": winner["key"], "deployment": str(deployed), "model": str(model_dir),
                "files": sorted(p.name for p in deployed.iterdir()), "reload_equals_measured": same,
                "reload_parity": parity(reloaded, twin, ids)}


def _arch(candidate: dict[str, Any]) -> str:
    return _recipe(candidate).arch_key()


class ComplianceValidator(_AdasRole):
    """``certify``: the winner's certificate (``certificate.write_certificate``: each requirement,
    the measured value, pass or fail, the evidence file, copied beside it), verified by re-deriving
    every number from the evidence; with no winner, ``unmet.json``: for each requirement, how many
    candidates met it and the best value any reached, and which requirements no candidate met."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.adas.certificate import machine, verify_certificate, write_certificate
        from phases.adas.safety import Requirement

        archive, plan, deploy = inputs[last_archive(inputs)], inputs["plan"], inputs["deploy"]
        out = Path(payload["certificate"])
        if not deploy["deployed"]:
            unmet = _unmet(payload, archive["archive"])
            atomic_write_json(Path(payload["work"]) / "certify" / "unmet.json", unmet)
            return {"passed": False, "unmet": unmet, "file": str(Path(payload["work"]) / "certify" / "unmet.json")}
        winner = archive["archive"][archive["winner"]]
        reference = inputs["safety-0"]["reference"]
        evidence = {}
        for src in (evidence_file(payload, winner["key"]), Path(reference["evidence"])):
            name = f"evidence/{src.name}"
            (out / "evidence").mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / name)
            evidence[name] = out / name
        rows = [Requirement(**r) for r in json.loads(evidence_file(payload, winner["key"]).read_text())["requirements"]]
        path = write_certificate(out, profile_name=plan["profile"], profile=plan["profile_json"], candidate=winner,
                                 rows=rows, artifact_dir=deploy["deployment"], evidence=evidence,
                                 reference=reference["metrics"], machine_info=machine())
        verify_certificate(path)
        return {"passed": all(r.passed for r in rows), "certificate": str(path),
                "markdown": str(out / "certificate.md"),
                "requirements": [r.to_json() for r in rows]}


def evidence_file(payload: dict[str, Any], key: str) -> Path:
    """The evidence file the safety monitor wrote for candidate ``key``."""
    return Path(payload["work"]) / "evidence" / f"{key}.json"


def _unmet(payload: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Per requirement: candidates measured, how many met it, the best measured value and the
    limit; ``none_met``: the requirements no candidate met."""
    table: dict[str, dict[str, Any]] = {}
    for c in candidates:
        if c["error"]:
            continue
        for r in json.loads(evidence_file(payload, c["key"]).read_text())["requirements"]:
            t = table.setdefault(r["name"], {"requirement": r["description"], "limit": r["limit"], "measured": 0,
                                             "met": 0, "best": None})
            t["measured"] += 1
            t["met"] += int(r["passed"])
            v = r["measured"]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                higher = r["name"] == "accuracy_retention"
                t["best"] = v if t["best"] is None else (max(t["best"], v) if higher else min(t["best"], v))
    errors = [f"{c['key']}: {c['error']}" for c in candidates if c["error"]]
    return {"requirements": table, "none_met": sorted(n for n, t in table.items() if t["met"] == 0),
            "candidates": len(candidates), "failed_to_measure": errors}
