"""Where one pass of the DaViT vision tower spends its time in florence2-rs, per dtype, as a table that adds up.

florence2-rs records, when its profile is on, the self time of each operation the tower runs (the wall time
of a span minus that of the spans inside it, on the thread that drives the model), by kind and vision stage
(src/profile.rs). This script loads a checkpoint in each dtype asked, runs the tower once to warm up, then
`--repeats` times with the profile on, and prints per dtype:

- per operation kind: seconds per pass, share of the pass, and for the linear layers (the GEMMs, patch
  embeddings included) the GFLOP and the GFLOP/s they ran at;
- per stage: seconds per pass, GEMM and non-GEMM;
- the non-GEMM share of the pass (everything but `linear`) and, with --transformers, transformers' tower
  time on the same input and threads, and the ratio.

With `--rounds N` the two sides run in turn N times (ours, theirs, ours, theirs ...), each round a fresh
process per side; the table is the median round's, and the ratio is the median of the rounds' ratios, so that a
machine whose speed drifts (a shared VM) moves both sides of a pair alike.

`tower: other` is the time inside the tower that no finer span covers (reshapes, views, bookkeeping).

    python benches/tower_profile.py --model CHECKPOINT [--dtype float32 --dtype bfloat16 --dtype int8]
        [--threads 2] [--repeats 3] [--size 768] [--transformers] [--rounds 1]

CHECKPOINT: a checkpoint folder (either layout), e.g. a full-size random-weight one made by
`python tests/fixtures/make_fixtures.py OUT --spec base` (OUT/base/hf). int8/int4 load with
`BitsAndBytesConfig` in bfloat16, as benches/compare.py does. Each dtype runs in its own subprocess with
RAYON_NUM_THREADS (and, for transformers, torch's threads) set to --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

QUANTIZED = ("int8", "int4")


def cpu_name() -> str:
    """lscpu's model name and family, as every figure of the project names its CPU."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    return f"{fields.get('model name', '?')}, CPU family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}"


def pixels(size: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)


def ours(path: Path, dtype: str, repeats: int, size: int) -> dict:
    from florence2_rs import BitsAndBytesConfig, Florence2ForConditionalGeneration, _native

    if dtype in QUANTIZED:
        quantization = BitsAndBytesConfig(load_in_8bit=dtype == "int8", load_in_4bit=dtype == "int4")
        model = Florence2ForConditionalGeneration.from_pretrained(path, dtype="bfloat16",
                                                                  quantization_config=quantization)
    else:
        model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    native = model._state.native
    values = pixels(size)
    native.vision_features(values)  # warm-up: first-touch pages, thread pool
    _native.profile_take()
    _native.profile_enable(True)
    start = time.perf_counter()
    for _ in range(repeats):
        native.vision_features(values)
    wall = (time.perf_counter() - start) / repeats
    _native.profile_enable(False)
    rows = [list(row) for row in _native.profile_take()]
    return {"wall": wall, "rows": rows}


def theirs(path: Path, dtype: str, repeats: int, size: int) -> dict:
    import torch
    from transformers import Florence2ForConditionalGeneration

    torch_dtype = torch.bfloat16 if dtype in QUANTIZED else getattr(torch, dtype)
    model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    values = torch.from_numpy(pixels(size)).to(torch_dtype)
    with torch.inference_mode():
        model.model.vision_tower(values)
        start = time.perf_counter()
        for _ in range(repeats):
            model.model.vision_tower(values)
    return {"wall": (time.perf_counter() - start) / repeats}


def run_worker(side: str, args: argparse.Namespace, dtype: str) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", side, "--model", str(args.model), "--dtype", dtype,
           "--repeats", str(args.repeats), "--size", str(args.size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(dtype: str, result: dict, reference: float | None, repeats: int, ratio: float | None) -> None:
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    by_stage: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for stage, kind, calls, seconds, flops in result["rows"]:
        entry = by_kind[kind]
        entry[0] += seconds / repeats
        entry[1] += flops / repeats
        entry[2] += calls / repeats
        label = "outside stages" if stage is None else f"stage {stage}"
        by_stage[label][0 if kind == "linear" else 1] += seconds / repeats
    total = sum(entry[0] for entry in by_kind.values())
    gemm = by_kind.get("linear", [0.0, 0.0, 0])[0]
    print(f"\n## {dtype}: one tower pass {result['wall']:.3f} s wall, {total:.3f} s in spans")
    print("| kind | calls | s / pass | share | GFLOP | GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, (seconds, flops, calls) in sorted(by_kind.items(), key=lambda item: -item[1][0]):
        rate = f"{flops / seconds / 1e9:.0f}" if flops and seconds else ""
        gflop = f"{flops / 1e9:.1f}" if flops else ""
        print(f"| {kind} | {calls:.0f} | {seconds:.3f} | {seconds / total:.1%} | {gflop} | {rate} |")
    print("\n| stage | GEMM s | other s |")
    print("|---|---:|---:|")
    for label, (gemm_s, other_s) in sorted(by_stage.items()):
        print(f"| {label} | {gemm_s:.3f} | {other_s:.3f} |")
    print(f"\nnon-GEMM share: {(total - gemm) / total:.1%}")
    if reference is not None and ratio is not None:
        print(f"transformers' tower ({'bfloat16' if dtype in QUANTIZED else dtype}): {reference:.3f} s "
              f"(median); ratio transformers / florence2-rs {ratio:.2f}x (median of the rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dtype", action="append",
                        choices=("float32", "bfloat16", "float16") + QUANTIZED, help="default: float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=768, help="image side in pixels (default 768)")
    parser.add_argument("--transformers", action="store_true", help="also time transformers' tower")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the two sides in turn (median)")
    parser.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = args.dtype or ["float32"]
    if args.worker:
        work = ours if args.worker == "ours" else theirs
        print(json.dumps(work(args.model, dtypes[0], args.repeats, args.size)))
        return
    print(f"# {cpu_name()}, {args.threads} threads, {args.size}x{args.size}, "
          f"{time.strftime('%Y-%m-%d')}, mean of {args.repeats}")
    for dtype in dtypes:
        results, references = [], []
        for _ in range(max(args.rounds, 1)):
            results.append(run_worker("ours", args, dtype))
            if args.transformers:
                references.append(run_worker("theirs", args, dtype)["wall"])
        median_round = sorted(results, key=lambda r: r["wall"])[len(results) // 2]
        reference = statistics.median(references) if references else None
        ratio = (statistics.median(ref / res["wall"] for ref, res in zip(references, results))
                 if references else None)
        report(dtype, median_round, reference, args.repeats, ratio)


if __name__ == "__main__":
    main()
