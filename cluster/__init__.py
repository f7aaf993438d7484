"""Where Agent Forge runs: connect to or start Ray, submit jobs, deployment manifests.

- ``connect`` / ``shutdown`` (connect.py): the one place the driver calls ``ray.init``:
  explicit address, else ``RAY_ADDRESS``, else an embedded local Ray with its dashboard on
  127.0.0.1; token authentication as Ray 2.60 does it.
- ``LocalCluster`` (local.py): several Ray nodes on one machine, for tests and for trying
  multi-node scaling.
- ``submit`` / ``follow_job`` (jobs.py): ``agentforge submit``, around Ray's
  ``JobSubmissionClient``: uploads the project, streams logs, maps the job's end to an exit
  code.
- ``manifests/`` (``MANIFESTS_DIR``): a KubeRay ``RayJob`` and a Ray cluster-launcher config
  that run ``agentforge run configs/small.yaml``.

The function ``connect`` is imported here on purpose: it shares its name with the module
``cluster.connect``, and only an import in this file makes ``cluster.connect`` the
function (so ``import cluster.connect as m`` yields the function too; reach the module's
other names with ``from cluster.connect import ...``).
"""

from __future__ import annotations

from pathlib import Path

from cluster.connect import ClusterError, ClusterInfo, connect, current, shutdown
from cluster.jobs import JobOutcome, agentforge_entrypoint, follow_job, submit, submit_entrypoint
from cluster.local import LocalCluster

__all__ = [
    "ClusterError",
    "ClusterInfo",
    "connect",
    "shutdown",
    "current",
    "LocalCluster",
    "JobOutcome",
    "submit",
    "submit_entrypoint",
    "follow_job",
    "agentforge_entrypoint",
    "MANIFESTS_DIR",
]

# The KubeRay and cluster-launcher configs, shipped as package data.
MANIFESTS_DIR = Path(__file__).resolve().parent / "manifests"
