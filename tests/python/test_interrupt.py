"""Ctrl-C during a long native call: the call ends with KeyboardInterrupt within about a second, as Python code
would, and the model stays usable (the next call gives the ids it gave before).

Each case runs in its own Python process, which loads the end-to-end checkpoint (the released vocabulary, so
that a decoding step takes a while), makes a short reference call, times one uninterrupted call, says it is
ready with that duration and starts a call ten times longer; the test sends SIGINT a moment later and times
how long the process takes to say it caught KeyboardInterrupt. The latency must be under about a second, and the
long call lasts several times that, so a call that runs on to its end (or to a check far from the signal) fails.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# Seconds from SIGINT to KeyboardInterrupt that count as "within about a second" on a loaded CI machine.
MAX_LATENCY = 1.0
# The share of the timed call to wait after the process is ready, so that SIGINT arrives while the native call
# runs (a call copies its inputs before it releases the GIL).
SETTLE_SHARE = 0.3
TIMEOUT = 240

SETUP = textwrap.dedent("""
    import sys
    import numpy as np
    from PIL import Image
    from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration

    folder = sys.argv[1]
    model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=["<OD>"] * 2, images=[Image.new("RGB", (64, 64), (200, 40, 40))] * 2,
                       return_tensors="np")
""")

# `timed()` runs the uninterrupted call and returns its seconds; `long()` returns a call that does ten times its
# work, its inputs made beforehand.
# Beam search: 100 tokens timed, then forced to 1000 (the longest output the checkpoint's positions allow).
GENERATE = SETUP + textwrap.dedent("""
    import time

    def short():
        return model.generate(**inputs, max_new_tokens=8, num_beams=2)

    def timed():
        start = time.monotonic()
        model.generate(**inputs, max_new_tokens=100, min_new_tokens=100, num_beams=8)
        return time.monotonic() - start

    def long():
        return lambda: model.generate(**inputs, max_new_tokens=1000, min_new_tokens=1000, num_beams=8)
""")

# The vision tower: a batch timed (doubled until it takes half a second, so that a fast machine is measured
# against a call long enough for the signal checks to show), then ten times that batch.
VISION = SETUP + textwrap.dedent("""
    import time

    image = inputs["pixel_values"][:1]
    batch = 2

    def short():
        return model.get_image_features(pixel_values=image).pooler_output

    def timed():
        global batch
        while True:
            start = time.monotonic()
            model.get_image_features(pixel_values=np.repeat(image, batch, axis=0))
            took = time.monotonic() - start
            if took >= 0.5 or batch >= 32:
                return took
            batch *= 2

    def long():
        big = np.repeat(image, 10 * batch, axis=0)
        return lambda: model.get_image_features(pixel_values=big)
""")

RUN = textwrap.dedent("""
    before = np.asarray(short())
    took = timed()
    call = long()
    print("ready", took, flush=True)
    try:
        call()
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    print("same" if np.array_equal(np.asarray(short()), before) else "different", flush=True)
""")


def _read_line(proc: subprocess.Popen, deadline: float) -> str:
    """The process's next line of output, or a failure once `deadline` (time.monotonic()) passes."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            pytest.fail("the process did not answer in time")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                pytest.fail(f"the process ended (code {proc.returncode}): {proc.stderr.read()}")
            return line.strip()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is a POSIX test")
@pytest.mark.parametrize("call", ["generate", "vision_tower"])
def test_ctrl_c_stops_a_long_call_and_leaves_the_model_usable(end_to_end_checkpoint, call):
    code = {"generate": GENERATE, "vision_tower": VISION}[call] + RUN
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(end_to_end_checkpoint / "hf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        ready, uninterrupted = _read_line(proc, deadline).split()
        assert ready == "ready"
        uninterrupted = float(uninterrupted)
        time.sleep(SETTLE_SHARE * uninterrupted)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        outcome = _read_line(proc, deadline)
        latency = time.monotonic() - sent
        assert outcome == "interrupted", outcome
        assert latency < MAX_LATENCY, (
            f"KeyboardInterrupt came {latency:.2f} s after SIGINT; the timed call took {uninterrupted:.2f} s")
        assert _read_line(proc, deadline) == "same", "the call after the interrupted one gave other results"
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
