"""Importing the model libraries once per process, with Python's cyclic garbage collector paused.

Importing torch, diffusers and transformers makes some 460,000 Python objects (modules, classes,
functions) that live as long as the process. The cyclic collector, seeing the heap grow that much,
walks all of them several times on the way, and every later full collection walks them again: 1.0 to
1.6 s of a 12-second ``lora-nodes run`` on 2 CPU cores went to collections. Imported with the
collector paused, then frozen (``gc.freeze``: later collections skip them), they cost no collection:
the run's take 0.02 s. The cost: the garbage the imports leave is never collected (about 9 MB;
445 MB resident after the imports against 436 MB).

The CLI's ``run`` and ``serve`` and the sweep's worker processes call it; the ComfyUI pack does not
(its process is ComfyUI's to tune).
"""

from __future__ import annotations

import functools
import gc


@functools.cache  # once per process: a second call would only freeze what the process made since
def import_model_libraries() -> None:
    """Import torch, transformers and diffusers' pipeline base (which imports most of what loading a
    model needs) with the collector paused, then freeze what the process holds.

    A library that fails to import is left for the node that needs it to report, naming itself.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import DiffusionPipeline  # noqa: F401
    except (ImportError, OSError, RuntimeError, AttributeError):  # how a broken install fails
        pass  # the node that loads a model says what is wrong, naming itself
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
