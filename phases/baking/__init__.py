"""Phase 6, tool and persona baking, and the inference optimisations of the baking team. One file each:

- ``config.py``: the ``baking:`` section;
- ``tools.py``: a registry of tools that really execute (a safe ``ast`` calculator, a lookup over the
  local ``knowledge.json``), the ``<tool>name(arg)</tool> -> result`` call syntax, ``execute_calls``, the
  inference loop ``run_with_tools`` and ``greedy_generate``;
- ``toolformer.py``: Toolformer's data filter (Schick et al. 2023), keeping a call only if its result
  lowers the weighted loss of the following tokens by at least tau_f;
- ``tooldata.py``: generated questions, candidate calls, Toolformer's data step and the fine-tune;
- ``evaluate.py``: tool-call and task accuracy on held-out questions through the inference loop;
- ``persona.py``: Prompt Baking's KL objective (Bhargava et al. 2024), full or LoRA;
- ``traits.py``: the persona trait scorer (what it measures is in its docstring);
- ``graph.py``, ``accelerate.py``, ``memory.py``, ``hardware.py``: the graph rewrites, the decoders, the
  memory measurements and the hardware target, each measured and applied only where it helps.

The nine agents that run these are in ``actors/baking/``; the phase's driver is
``coordinator/drivers/baking.py``. Importing this package imports nothing (no torch); import the
submodules explicitly.
"""
