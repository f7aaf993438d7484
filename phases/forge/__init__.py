"""Phase 5, Forge training: ``train.py`` runs it (``train_forge``); its parts, one file each:

- ``grokfast.py``: the Grokfast EMA and MA gradient filters (also used by phase 4's QAT);
- ``curriculum.py``: the four stages (warm-up, acceleration, consolidation, refinement);
- ``edge.py``: edge-of-chaos control of the training tasks' difficulty;
- ``dream.py``: dream cycles, replaying a reservoir of earlier training rows;
- ``selfmodel.py``: self-modeling heads that predict the model's later hidden states;
- ``sources.py`` and ``data.py``: training files in five formats, streamed through a quality
  filter into a memory-mapped token cache with a fixed validation split;
- ``config.py``: the ``forge:`` config section.

Importing this package imports nothing (no torch); import the submodules explicitly.
"""
