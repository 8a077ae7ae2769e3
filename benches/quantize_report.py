"""florence2-rs with quantized linear layers (`NativeModel.load(..., quantize="int8"|"int4")`) against the
dense f32 model on the same full-size random checkpoint: peak RSS, load time, time of a greedy generate,
greedy token agreement with f32 and the largest logit error (relative to the largest f32 logit).

    python benches/quantize_report.py /work/bench-ckpt/base/hf [--new-tokens 64] [--threads 2]

Each variant runs in its own process (so that peak RSS is its own); build the checkpoint with
benches/compare.py or tests/fixtures/make_fixtures.py first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = (None, "int8", "int4")


def worker(path: Path, quantize: str | None, new_tokens: int) -> dict:
    import resource

    import numpy as np
    from florence2_rs import _native

    sys.path.insert(0, str(Path(__file__).parent))
    from compare import DECODER_START, _inputs

    start = time.perf_counter()
    model = _native.NativeModel.load(path, "float32", "cpu", quantize)
    load = time.perf_counter() - start
    pixel_values, input_ids = _inputs()
    settings = json.dumps({"num_beams": 1, "do_sample": False, "min_new_tokens": new_tokens,
                           "max_new_tokens": new_tokens})
    start = time.perf_counter()
    ids = model.generate(input_ids, None, pixel_values, None, kwargs=settings)["sequences"][0].tolist()
    generate = time.perf_counter() - start
    # Logits of the first f32 continuation, so that every variant is scored on the same decoder inputs.
    decoder_ids = np.array([[DECODER_START] + list(range(3, 3 + 15))], dtype=np.int64)
    logits = model.forward(input_ids, decoder_ids, None, pixel_values, None)["logits"]
    np.save(os.environ["FLORENCE2_LOGITS_OUT"], logits)
    return {"load (s)": load, "greedy generate (s)": generate, "ids": ids,
            "peak RSS (MiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.path, args.worker or None, args.new_tokens)))
        return

    import tempfile

    import numpy as np

    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.npy"
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), FLORENCE2_LOGITS_OUT=str(out))
            cmd = [sys.executable, __file__, str(args.path), "--worker", variant or "",
                   "--new-tokens", str(args.new_tokens)]
            run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
            logits[variant] = np.load(out)
    ref_ids, ref_logits = results[None]["ids"], logits[None]
    scale = float(np.abs(ref_logits).max())
    print("| weights | load (s) | greedy generate (s) | peak RSS (MiB) | greedy tokens equal to f32 | "
          "max logit error / max logit |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        r = results[variant]
        agree = sum(a == b for a, b in zip(r["ids"], ref_ids)) / len(ref_ids)
        err = float(np.abs(logits[variant] - ref_logits).max()) / scale
        print(f"| {variant or 'f32'} | {r['load (s)']:.2f} | {r['greedy generate (s)']:.2f} | "
              f"{r['peak RSS (MiB)']:.0f} | {agree:.1%} | {err:.4f} |")


if __name__ == "__main__":
    main()
