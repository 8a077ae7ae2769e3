"""Seeds for sampling: `set_seed`, and the seed each `generate(do_sample=True)` call draws from the caller's random
state when it is given none.

transformers samples with `torch.multinomial`, so a script that calls `torch.manual_seed` (or transformers'
`set_seed`) repeats its samples. The native sampler has its own generator (ChaCha8, seeded by the `seed`
generation setting); to follow the seeds users set, each sampling call without a `seed` draws one:

- from torch's default CPU generator when torch is imported (one draw per call, so that after
  `torch.manual_seed(n)` a script's sequence of generate calls repeats, and consecutive calls differ);
- else from this module's generator, which `set_seed` seeds and which starts from OS entropy.

A draw never imports torch (a script that does not use torch does not load it). `set_seed` seeds torch whenever
it is installed, importing it as transformers' `set_seed` does, so that the last seed a script set is the one its
samples follow, whichever of `set_seed` and `torch.manual_seed` came last.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
import threading

import numpy as np

__all__ = ["set_seed"]

# The sampling seeds are 64-bit; torch draws int64, which is reinterpreted as unsigned.
_SEED_BITS = 64
# The seeds `set_seed` takes: numpy's range, the narrowest of the generators it seeds.
_MAX_SEED = 2 ** 32 - 1

_lock = threading.Lock()
# Draws the sampling seeds when torch is not imported; `random.Random()` seeds itself from OS entropy.
_generator = random.Random()


def set_seed(seed: int, deterministic: bool = False) -> None:
    """transformers' `set_seed`: seeds Python's `random`, numpy, torch and florence2-rs' sampling, so that a
    script's `generate(do_sample=True)` calls repeat their samples.

    torch is seeded (`manual_seed`, `cuda.manual_seed_all`) whenever it is installed (imported here if it is not
    yet), as transformers does.

    Args:
        seed: the seed, an integer from 0 to 2**32 - 1 (numpy's range).
        deterministic: as in transformers, also `torch.use_deterministic_algorithms(True)` where torch is
            installed (florence2-rs' own computations are deterministic either way).

    Raises:
        ValueError: a seed outside 0 to 2**32 - 1 (nothing is seeded then).
        TypeError: a seed that is not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, not {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be between 0 and 2**32 - 1 (numpy's range), got {seed}")
    torch = _installed_torch()
    random.seed(seed)
    np.random.seed(seed)
    with _lock:
        _generator.seed(seed)
    if torch is not None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
        if deterministic:
            torch.use_deterministic_algorithms(True)


def _installed_torch():
    """torch, imported if it is installed and not imported yet; None where it is not installed."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch
    try:
        if importlib.util.find_spec("torch") is None:
            return None
    except (ImportError, ValueError):  # an import hook refusing it, or a broken module entry: not available
        return None
    return importlib.import_module("torch")


def sampling_seed() -> int:
    """The seed of one sampling call: one draw from torch's default CPU generator when torch is imported, else
    from florence2-rs' generator (see the module docstring).

    Returns:
        A seed in [0, 2**64).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        with _lock:
            return _generator.getrandbits(_SEED_BITS)
    draw = torch.randint(-(2 ** 63), 2 ** 63 - 1, (1,), dtype=torch.int64).item()
    return draw % (2 ** _SEED_BITS)
