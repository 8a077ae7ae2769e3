"""Makes `import torch` fail, for the tests that check a code path without torch (in a subprocess, since the test
process itself has torch imported)."""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path


class NoTorch(importlib.abc.MetaPathFinder):
    """A finder, first on `sys.meta_path`, that refuses torch and its submodules."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
        return None


def install() -> None:
    """Blocks torch in this process from now on (torch must not be imported yet)."""
    sys.meta_path.insert(0, NoTorch())


# The lines a subprocess script starts with to block torch before anything imports it.
PRELUDE = (f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
           "import torch_blocker\ntorch_blocker.install()\n")
