"""Pipeline configuration: pydantic models, YAML loading, presets.

A pipeline config is a YAML file validated by :class:`PipelineConfig`. Each phase owns its own
section model (``phases/<name>/config.py``); this module composes them. Every problem of a file
is reported at once in one :class:`~coordinator.errors.ConfigError`, each naming its key path,
the bad value and what is allowed (an unknown key lists the known ones).

Presets live in ``configs/<name>.yaml``: ``tiny`` (tests and demo, minutes on 2 cores),
``small`` (the reference analysis' 25M-parameter models) and ``base``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from coordinator.chaos import ChaosConfig
from coordinator.errors import ConfigError
from phases.cognate.config import CognateConfig
from phases.bitnet.config import BitNetConfig
from phases.adas.config import AdasConfig
from phases.baking.config import BakingConfig
from phases.compression.config import CompressConfig
from phases.data.config import DataConfig, FrozenConfig, config_error
from phases.evomerge.config import EvoMergeConfig
from phases.forge.config import ForgeConfig
from phases.quietstar.config import QuietStarConfig

__all__ = [
    "PRESETS_DIR",
    "PipelineConfig",
    "WandbConfig",
    "RayConfig",
    "load_config",
    "parse_config",
    "preset_names",
    "apply_overrides",
]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


class WandbConfig(FrozenConfig):
    # offline: runs are written under RUN/wandb and can be uploaded later with `wandb sync`;
    # online: needs WANDB_API_KEY; disabled: no W&B at all (lineage is still in result.json).
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "agentforge"
    entity: str | None = None


class RayConfig(FrozenConfig):
    # Ray address ("auto", "ray://host:10001", "host:6379"); None: RAY_ADDRESS or an embedded
    # local Ray.
    address: str | None = None
    # CPUs given to an embedded local Ray; None: all of the machine's.
    num_cpus: int | None = Field(default=None, ge=1)
    # CPUs per training task. Torch's intra-op threads are set to this number so that the
    # floating-point reduction order, and with it the model hashes, do not depend on the
    # machine's core count.
    cpus_per_task: int = Field(default=1, ge=1)


class PipelineConfig(FrozenConfig):
    # A name for the run; the run folder defaults to runs/<name>-<timestamp>.
    name: str = "agentforge"
    # Seeds data order, initialisation and sampling of every phase.
    seed: int = Field(default=1234, ge=0)
    # The phases to run, in pipeline order, by name or number ("cognate", 1, "1-2").
    phases: list[str | int] = Field(default_factory=lambda: ["cognate"])
    # What the pipeline does when a phase fails: abort (stop, leave a resumable run folder)
    # or continue with the phases that do not depend on the failed one.
    on_phase_failure: Literal["abort", "continue"] = "abort"
    wandb: WandbConfig = WandbConfig()
    ray: RayConfig = RayConfig()
    # Fault injection into the agent teams (coordinator/chaos.py); all rates 0: off.
    chaos: ChaosConfig = ChaosConfig()
    data: DataConfig = DataConfig()
    cognate: CognateConfig = CognateConfig()
    evomerge: EvoMergeConfig = EvoMergeConfig()
    quietstar: QuietStarConfig = QuietStarConfig()
    bitnet: BitNetConfig = BitNetConfig()
    forge: ForgeConfig = ForgeConfig()
    baking: BakingConfig = BakingConfig()
    adas: AdasConfig = AdasConfig()
    compress: CompressConfig = CompressConfig()

    def section(self, phase: str) -> BaseModel | None:
        """The config section of ``phase``, or None when the phase has none."""
        return getattr(self, phase, None) if phase in type(self).model_fields else None


def preset_names() -> list[str]:
    """Names of the shipped presets (``configs/*.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def parse_config(data: dict[str, Any], *, source: str = "<config>") -> PipelineConfig:
    """Validate a config mapping.

    Raises:
        ConfigError: listing every problem as ``key.path: message``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        problems = config_error(PipelineConfig, err).problems
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n{lines}", problems) from None
    return cfg


def _parse_scalar(text: str) -> Any:
    # YAML's scalar rules give "3" -> 3, "true" -> True, "[1, 2]" -> [1, 2], as in the file.
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config mapping."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return out


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> tuple[PipelineConfig, dict[str, Any]]:
    """Load a config from a YAML file or a preset name, apply overrides and validate it.

    Args:
        path: a YAML file. Exclusive with ``preset``.
        preset: a preset name from ``configs/`` (default ``tiny`` when neither is given).
        overrides: ``key.path=value`` strings applied after loading.

    Returns:
        The validated config and the raw mapping it came from (kept in the run folder).

    Raises:
        ConfigError: missing file, bad YAML, or any invalid key or value.
    """
    if path is not None and preset is not None:
        raise ConfigError("give a config file or --preset, not both")
    if path is None:
        name = preset or "tiny"
        path = PRESETS_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if overrides:
        data = apply_overrides(data, overrides)
    # User data files (the corpus, phase 5's training files) are relative to the config file, not
    # to where the command (or a Ray worker on another node) runs.
    for keys in (("data", "corpus"), ("forge", "data", "files")):
        parent, files = data, data
        for key in keys:
            parent, files = files, files.get(key) if isinstance(files, dict) else None
        if isinstance(files, list):
            parent[keys[-1]] = [str((path.parent / f).resolve()) if isinstance(f, str) else f for f in files]
    return parse_config(data, source=str(path)), data
