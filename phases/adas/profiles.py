"""Phase 7's target profiles: what a deployment must meet on the hardware it runs on.

A profile states requirements, each checked against a measurement of the deployed artifact
(``safety.py``): latency budgets (p95 and p99 of one call, and of one generated token, in ms),
a memory cap (peak resident growth while the artifact loads and runs), a disk cap (bytes of the
artifact), an accuracy floor relative to the input model (held-out next-token accuracy), an
output-parity bound of the artifact vs its own float32 eager twin (the same architecture: the
backend and precision must keep the outputs; what the architecture changes costs is the accuracy
floor's business), and the precisions, backends, thread counts and batch sizes it allows.

The built-in profiles (:data:`BUILTIN_PROFILES`), with where their numbers come from:

- ``cloud-gpu``: a datacenter GPU serving interactive requests. Budgets of an interactive
  service (call p95 50 ms, token p95 20 ms), bounded accuracy loss (1%).
- ``edge-cpu``: a laptop or edge box CPU. Call p95 100 ms / p99 200 ms, token p95 50 ms, 2 GiB
  memory, 5% accuracy loss.
- ``mobile``: a phone-class CPU: at most 2 threads, 256 MiB memory, 100 MiB on disk, 10% loss.
- ``automotive-edge``: the reference analysis' hard real-time budget of the driver-assistance
  pipeline: under 10 ms total (p99 of one call <= 10 ms, and of one generated token), target
  8 ms (:attr:`TargetProfile.target_ms`, reported, not gating), hard deadlines (any timed call
  over 10 ms rejects the candidate), batch 1, 3% accuracy loss, tight parity. Its hardware
  class is an embedded GPU/SoC; measured elsewhere, the certificate says on which machine it
  holds.

Users add profiles in the config (``adas.profiles: {name: {...}}``) or override a built-in one
by name; an unknown field or value is a ConfigError naming it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from phases.data.config import FrozenConfig

__all__ = ["BUILTIN_PROFILES", "TargetProfile", "resolve_profile"]

Backend = Literal["eager", "compile", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "ternary"]


class TargetProfile(FrozenConfig):
    """One deployment target's requirements (see the module docstring). A ``None`` limit is not
    required (and not certified)."""

    description: str = ""
    hardware_class: str = "this machine"  # what the profile is meant for (recorded on the certificate)
    devices: tuple[Literal["cpu", "cuda"], ...] = ("cpu",)  # in order of preference; the first present is used
    call_p95_ms: float | None = Field(None, gt=0)  # one forward of (batch, call_tokens)
    call_p99_ms: float | None = Field(None, gt=0)
    token_p95_ms: float | None = Field(None, gt=0)  # one greedy decoding step of the batch
    token_p99_ms: float | None = Field(None, gt=0)
    target_ms: float | None = Field(None, gt=0)  # a soft goal for call p99: reported, never gating
    # Hard real time: every timed call and decoding step must finish inside its p99 budget; one that
    # does not is a deadline miss, and a miss rejects the candidate (not a warning).
    hard_deadline: bool = False
    memory_cap_mb: float | None = Field(None, gt=0)  # peak resident growth while loading and running
    disk_cap_mb: float | None = Field(None, gt=0)  # bytes of the artifact's files
    min_accuracy_retention: float = Field(0.95, ge=0.0, le=1.0)  # candidate / input held-out accuracy
    max_parity_error: float = Field(0.05, ge=0.0)  # max |logit diff| / max |logit| vs the fp32 eager twin
    precisions: tuple[Precision, ...] = ("fp32", "fp16", "bf16", "int8", "ternary")
    backends: tuple[Backend, ...] = ("eager", "compile", "onnxruntime", "tensorrt")
    threads: tuple[int, ...] = (1, 2, 4)
    batch_sizes: tuple[int, ...] = (1,)
    call_tokens: int = Field(32, ge=1)  # sequence length of one call
    prompt_tokens: int = Field(16, ge=1)  # prompt length for the per-token measurement
    new_tokens: int = Field(8, ge=1)  # tokens generated per per-token measurement

    @model_validator(mode="after")
    def _check(self) -> "TargetProfile":
        for name in ("devices", "precisions", "backends", "threads", "batch_sizes"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must list at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {list(values)}")
        if any(t < 1 for t in self.threads) or any(b < 1 for b in self.batch_sizes):
            raise ValueError("threads and batch_sizes must be >= 1")
        for lo, hi in (("call_p95_ms", "call_p99_ms"), ("token_p95_ms", "token_p99_ms")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) must be <= {hi} ({b})")
        if self.hard_deadline and self.call_p99_ms is None and self.token_p99_ms is None:
            raise ValueError("hard_deadline needs a deadline: set call_p99_ms or token_p99_ms")
        return self


BUILTIN_PROFILES: dict[str, TargetProfile] = {
    "cloud-gpu": TargetProfile(
        description="datacenter GPU, interactive serving", hardware_class="datacenter GPU (CUDA)",
        devices=("cuda",), call_p95_ms=50, call_p99_ms=100, token_p95_ms=20, token_p99_ms=40,
        memory_cap_mb=16384, min_accuracy_retention=0.99, max_parity_error=0.02,
        precisions=("fp32", "fp16", "bf16", "int8"), backends=("eager", "compile", "onnxruntime", "tensorrt"),
        threads=(1,), batch_sizes=(1, 8)),
    "edge-cpu": TargetProfile(
        description="laptop or edge box CPU", hardware_class="x86-64/ARM CPU, 2-8 cores",
        devices=("cpu",), call_p95_ms=100, call_p99_ms=200, token_p95_ms=50, token_p99_ms=100,
        memory_cap_mb=2048, disk_cap_mb=1024, min_accuracy_retention=0.95, max_parity_error=0.05,
        precisions=("fp32", "bf16", "int8", "ternary"), backends=("eager", "compile", "onnxruntime"),
        threads=(1, 2, 4), batch_sizes=(1, 4)),
    "mobile": TargetProfile(
        description="phone-class CPU", hardware_class="mobile SoC CPU, <= 2 threads for the model",
        devices=("cpu",), call_p95_ms=200, token_p95_ms=100, token_p99_ms=200, memory_cap_mb=256,
        disk_cap_mb=100, min_accuracy_retention=0.90, max_parity_error=0.1,
        precisions=("fp16", "int8", "ternary"), backends=("eager", "onnxruntime"), threads=(1, 2),
        batch_sizes=(1,)),
    "automotive-edge": TargetProfile(
        description="hard real-time driver-assistance budget (reference analysis: under 10 ms total, "
                    "target 8 ms)", hardware_class="embedded automotive GPU/SoC (Jetson-class)",
        devices=("cuda", "cpu"), call_p99_ms=10, token_p99_ms=10, target_ms=8, hard_deadline=True,
        memory_cap_mb=1024,
        min_accuracy_retention=0.97, max_parity_error=0.02, precisions=("fp32", "fp16", "int8"),
        backends=("eager", "onnxruntime", "tensorrt"), threads=(1, 2, 4), batch_sizes=(1,), call_tokens=16),
}


def resolve_profile(name: str, custom: dict[str, TargetProfile] | None = None) -> TargetProfile:
    """The profile called ``name``: a custom one (the config's ``adas.profiles``) first, then a
    built-in one.

    Raises:
        KeyError: no such profile (the message lists the known names).
    """
    known = {**BUILTIN_PROFILES, **(custom or {})}
    if name not in known:
        raise KeyError(f"unknown ADAS target profile {name!r}; known: {', '.join(sorted(known))}")
    return known[name]
