"""Several threads on one model: the heavy calls release the GIL, so they run at the same time and give the
answers they give alone.

Asserted from timestamps, not speed, so that a loaded machine does not make it flaky: the calls' intervals
overlap, and a pure-Python ticker thread keeps ticking while they run. A call that held the GIL would freeze the
ticker for the whole call (a gap as long as the call); with the GIL released the gaps stay a small part of it.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import skimage
from PIL import Image

import florence2_rs

CALLS_PER_THREAD = 2


@pytest.fixture(scope="module")
def loaded(end_to_end_checkpoint):
    folder = end_to_end_checkpoint / "hf"
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder, dtype="float32")
    processor = florence2_rs.AutoProcessor.from_pretrained(folder)
    image = Image.fromarray(skimage.data.astronaut())
    return model, processor(text="<OD>", images=image, return_tensors="np")


def _run_together(jobs: dict) -> tuple[dict, dict]:
    """Runs each job CALLS_PER_THREAD times on its own thread, with a ticker beside them; returns the results
    and the (start, end) times by job, and the longest ticker gap under "gap"."""
    barrier = threading.Barrier(len(jobs))
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    results = {name: [] for name in jobs}
    spans = {name: [] for name in jobs}
    errors = []

    def work(name):
        try:
            barrier.wait()
            for _ in range(CALLS_PER_THREAD):
                start = time.perf_counter()
                results[name].append(jobs[name]())
                spans[name].append((start, time.perf_counter()))
        except BaseException as err:  # reported from the main thread
            errors.append(err)

    ticker = threading.Thread(target=tick)
    ticker.start()
    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    ticker.join()
    assert not errors, errors
    first = min(start for job in spans.values() for start, _ in job)
    last = max(end for job in spans.values() for _, end in job)
    inside = [t for t in ticks if first <= t <= last]
    spans["gap"] = max(np.diff([first, *inside, last]))
    return results, spans


def _assert_concurrent(spans: dict, a: str, b: str) -> None:
    """The two jobs' calls overlapped in time, and Python kept running meanwhile (the GIL was free)."""
    shortest = min(end - start for name in (a, b) for start, end in spans[name])
    assert _overlap(spans[a], spans[b]), spans
    assert spans["gap"] < shortest / 4, f"Python stalled {spans['gap']:.3f}s during calls of {shortest:.3f}s"


def _overlap(a: list, b: list) -> bool:
    return any(a0 < b1 and b0 < a1 for a0, a1 in a for b0, b1 in b)


def test_image_features_and_generate_overlap_and_agree(loaded):
    model, inputs = loaded
    pixels = inputs["pixel_values"]
    expected_features = model.get_image_features(pixels).pooler_output
    expected_ids = model.generate(**inputs, max_new_tokens=6, num_beams=2)

    results, spans = _run_together({
        "features": lambda: model.get_image_features(pixels).pooler_output,
        "generate": lambda: model.generate(**inputs, max_new_tokens=6, num_beams=2),
    })
    _assert_concurrent(spans, "features", "generate")
    for features in results["features"]:
        np.testing.assert_array_equal(features, expected_features)
    for ids in results["generate"]:
        np.testing.assert_array_equal(ids, expected_ids)


def test_same_call_from_two_threads(loaded):
    model, inputs = loaded
    expected = model(**inputs).logits
    results, spans = _run_together({name: (lambda: model(**inputs).logits) for name in ("a", "b")})
    _assert_concurrent(spans, "a", "b")
    for logits in results["a"] + results["b"]:
        np.testing.assert_array_equal(logits, expected)
