"""Phase 5, Forge training (issue #8). Built so far: the Grokfast gradient filters, EMA and MA
(``grokfast.py``), which phase 4's QAT already uses; the phase itself is not built and refuses
to run (``coordinator/drivers/__init__.py`` registers it as unbuilt).

Importing this package imports nothing (no torch); import the submodules explicitly.
"""
