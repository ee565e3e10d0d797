"""Keep torch.fx's registry of wrapped functions from growing with every module built.

The code torch.fx generates for a GraphModule that calls a wrapped function (budgetprune's channel
gathers and scatters, :mod:`budgetprune.ops`) registers that function again, with the generated
code's own globals, each time the module is compiled: on every load, copy and compaction. torch
never drops these registrations; each one holds its globals alive, and every later trace in the
process patches and restores all of them (the model-file fuzz test's 1900 loads left about 1400:
each trace then spent some 44 ms patching them). :func:`forget_unused_wraps` drops the
registrations whose globals nothing else uses any more (their module is gone); budgetprune calls
it before it traces and when it loads a model.
"""

from __future__ import annotations

import gc
import sys
from collections import defaultdict

from torch.fx import _symbolic_trace


#: Registrations beyond which :func:`forget_unused_wraps` first collects garbage (doubled each time
#: it is passed, so the collections stay rare): a dropped module whose class is in a reference
#: cycle holds its registrations until the garbage collector frees it.
COLLECT_ABOVE = 256
_collect_above = COLLECT_ABOVE


def forget_unused_wraps() -> int:
    """Drop torch.fx's wrap registrations of generated code no live module runs; return how many.

    A registration maps ``(id(globals), name)`` to the ``globals`` of the code that registered it.
    The globals of a live module are also referenced by its ``forward`` (and a real Python
    module's by ``sys.modules``): a globals dict referenced only by its own registrations is
    unused. Above :data:`COLLECT_ABOVE` registrations the garbage collector runs first. Where
    torch keeps the registry elsewhere (a future release) nothing is done."""
    global _collect_above
    registry = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if not isinstance(registry, dict):
        return 0
    dropped = _drop_unused(registry)
    if len(registry) > _collect_above:
        gc.collect()
        dropped += _drop_unused(registry)
        _collect_above = max(COLLECT_ABOVE, 2 * len(registry))
    return dropped


def _drop_unused(registry: dict) -> int:
    keys_of: dict[int, list] = defaultdict(list)
    for key in registry:
        keys_of[id(registry[key])].append(key)
    dropped = 0
    for keys in keys_of.values():
        # unused: referenced once per registration, and once more as getrefcount's argument
        if sys.getrefcount(registry[keys[0]]) <= len(keys) + 1:
            for key in keys:
                del registry[key]
            dropped += len(keys)
    return dropped
