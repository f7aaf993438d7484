"""The eight algorithms in plain PyTorch; no Ray here.

Each sub-package is one phase of the Agent Forge pipeline (DESIGN.md, "The eight phases").
They are pure functions and modules over tensors, HF model directories and files; the Ray
actors in ``actors/`` and the coordinator call them. ``tests/phases/test_no_ray.py`` imports
every module below this package and checks that ``ray`` was never imported.
"""
