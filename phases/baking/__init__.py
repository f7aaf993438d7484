"""Phase 6, tool and persona baking (issue #9). Built so far, one file each:

- ``tools.py``: a registry of tools that really execute (a safe ``ast`` calculator, a lookup over the
  local ``knowledge.json``), the ``<tool>name(arg)</tool> -> result`` call syntax, ``execute_calls``, the
  inference loop ``run_with_tools`` and ``greedy_generate``;
- ``toolformer.py``: Toolformer's data filter (Schick et al. 2023), keeping a call only if its result
  lowers the weighted loss of the following tokens by at least tau_f;
- ``persona.py``: Prompt Baking's KL objective (Bhargava et al. 2024).

Importing this package imports nothing (no torch); import the submodules explicitly.
"""
