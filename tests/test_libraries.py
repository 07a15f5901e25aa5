"""The model libraries are imported once per process with the cyclic collector paused, and frozen:
later collections do not walk the objects they made."""

import subprocess
import sys

CHECK = """
import gc, sys
from lora_nodes.libraries import import_model_libraries
assert "torch" not in sys.modules
before = gc.get_freeze_count()
import_model_libraries()
import_model_libraries()  # a second call does nothing
assert {"torch", "diffusers", "transformers", "diffusers.pipelines.pipeline_utils"} <= set(sys.modules)
assert gc.isenabled()
# what the imports made is frozen: a collection walks what came after, not the libraries
print(gc.get_freeze_count() - before, len(gc.get_objects()))
gc.disable()  # a process that paused the collector itself keeps it paused
import_model_libraries.__wrapped__()
assert not gc.isenabled()
"""


def test_the_libraries_are_imported_once_and_frozen():
    done = subprocess.run([sys.executable, "-c", CHECK], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    frozen, walked = (int(n) for n in done.stdout.split())
    assert frozen > 100_000 and walked < 1_000  # torch alone makes over 100,000 objects
