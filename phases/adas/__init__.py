"""Phase 7: ADAS, deployment architecture search (see the modules)."""
