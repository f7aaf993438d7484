"""Phase 8's compression team: nine agent roles (``roles.py``) over ``phases/compression/``, and
the orchestrator's task graph (``graph.py``). Importing this package registers the roles by
import path; the heavy code loads inside the agents."""

from actors.roles import register_lazy_role

_CLASSES = {
    "model-analyzer": "ModelAnalyzer",
    "pruning-agent": "PruningAgent",
    "quantization-agent": "QuantizationAgent",
    "knowledge-distiller": "KnowledgeDistiller",
    "architecture-optimizer": "ArchitectureOptimizer",
    "compression-validator": "CompressionValidator",
    "deployment-packager": "DeploymentPackager",
    "performance-profiler": "PerformanceProfiler",
    "compression-orchestrator": "CompressionOrchestrator",
}
for _role, _cls in _CLASSES.items():
    register_lazy_role(_role, f"actors.compression.roles:{_cls}")
