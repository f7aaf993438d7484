"""Phase 6's baking team: nine agent roles (``roles.py``) over ``phases/baking/``, and the
coordinator's task graph (``graph.py``). Importing this package registers the roles by import
path; the heavy code loads inside the agents."""

from actors.roles import register_lazy_role

_CLASSES = {
    "baking-coordinator": "BakingCoordinator",
    "model-optimizer": "ModelOptimizer",
    "quality-validator": "QualityValidator",
    "baking-profiler": "PerformanceProfiler",
    "inference-accelerator": "InferenceAccelerator",
    "graph-optimizer": "GraphOptimizer",
    "memory-optimizer": "MemoryOptimizer",
    "hardware-adapter": "HardwareAdapter",
    "deployment-preparer": "DeploymentPreparer",
}
for _role, _cls in _CLASSES.items():
    register_lazy_role(_role, f"actors.baking.roles:{_cls}")
