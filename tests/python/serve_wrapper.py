"""`florence2-serve` with two test-only controls over the model's generate, for the serving tests:

- SERVE_TEST_HOLD_FILE: while this file exists, generate waits (so that tests can fill the queue while the
  worker is busy, and release it when they are ready);
- SERVE_TEST_FAIL_IDS: comma-separated token ids; generate raises for a batch holding a row with exactly these
  input ids (an injected model error, to check that only that row's request fails);
- SERVE_TEST_SUPPRESS_FILE: a JSON list of token ids passed to every generate call as `suppress_tokens` (the
  random-weight test checkpoints then generate location tokens, so that answers have boxes and scores; the
  tests give the library the same setting).

The controls live here, in the tests, and reach the product only by wrapping its public generate method:
the server itself has no hook. Run as `python tests/python/serve_wrapper.py <florence2-serve arguments>`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from florence2_rs.modeling import Florence2ForConditionalGeneration
from florence2_rs.serve.cli import main

_generate = Florence2ForConditionalGeneration.generate
_HOLD = os.environ.get("SERVE_TEST_HOLD_FILE")
_FAIL = [int(i) for i in os.environ.get("SERVE_TEST_FAIL_IDS", "").split(",") if i]
_SUPPRESS = os.environ.get("SERVE_TEST_SUPPRESS_FILE")
_SUPPRESS_IDS = json.loads(Path(_SUPPRESS).read_text()) if _SUPPRESS else None


def _controlled_generate(self, input_ids=None, *args, **kwargs):
    while _HOLD and os.path.exists(_HOLD):
        time.sleep(0.01)
    rows = np.asarray(input_ids).tolist()
    if _FAIL and _FAIL in rows:
        raise RuntimeError("injected model error")
    if _SUPPRESS_IDS is not None:
        kwargs["suppress_tokens"] = _SUPPRESS_IDS
    return _generate(self, input_ids, *args, **kwargs)


Florence2ForConditionalGeneration.generate = _controlled_generate

if __name__ == "__main__":
    sys.exit(main())
