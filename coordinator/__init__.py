"""Control plane of Agent Forge: config, the pipeline runner, the run folder, tracking and the CLI.

No model math lives here. Submodules import Ray lazily where they need it, so that importing
``coordinator.errors`` or ``coordinator.config`` stays cheap.
"""
