"""Phase 7's ADAS team: nine agent roles (``roles.py``) over ``phases/adas/``, and the
coordinator's task graph (``graph.py``). Importing this package registers the roles by import
path; the heavy code loads inside the agents."""

from actors.roles import register_lazy_role

_CLASSES = {
    "adas-orchestrator": "ADASOrchestrator",
    "architecture-proposer": "ArchitectureProposer",
    "candidate-builder": "CandidateBuilder",
    "evaluator": "Evaluator",
    "latency-profiler": "LatencyProfiler",
    "safety-monitor": "SafetyMonitor",
    "edge-deployer": "EdgeDeployer",
    "compliance-validator": "ComplianceValidator",
    "archivist": "Archivist",
}
for _role, _cls in _CLASSES.items():
    register_lazy_role(_role, f"actors.adas.roles:{_cls}")
