"""Side-by-side benchmark, CPU or CUDA: transformers' Florence-2 against florence2-rs on one checkpoint.

Both sides load the same full-size random-weight checkpoint (made by transformers itself through
tests/fixtures/make_fixtures.py), each in its own subprocess limited to the same number of threads
(torch.set_num_threads + OMP/MKL for transformers, RAYON_NUM_THREADS for florence2-rs), and do the same
forced work:

- cold start: `import` of the package plus `from_pretrained` (the first thing a user's script waits for);
- generate: an `<OD>`-shaped prompt (577 `<image>` tokens + `<s><OD></s>`-like ids), one 768x768 image,
  num_beams=3 and exactly N new tokens (min_new_tokens = max_new_tokens = N), after one warm-up call;
- vision: the DaViT vision tower alone on the image;
- encoder: the BART encoder over the 581 prompt tokens (the image tokens embedded as text, no vision) plus
  one decoder position, the same call on both sides (`model(input_ids, decoder_input_ids=[[2]])`);
- decode step: one beam-search step over 3 beams, as (generate N tokens - generate 1 token) / (N - 1), the
  two calls run back to back in each repeat and the median taken over the repeats' differences (a slow spell
  of a shared machine then moves both calls of a difference alike), the same subtraction on both sides, so that it counts what a step really costs inside generate (decoder
  forward, LM head, logits processors, beam bookkeeping, cache reordering);
- RSS added by from_pretrained: RSS after it minus RSS before it (after the import): florence2-rs's weights
  (ours reads every tensor at load; transformers maps its safetensors file and reads pages at their first use,
  so its figure is below the size of its weights);
- peak RSS of the process (getrusage), which includes the import and the timed runs.

    python benches/compare.py --checkpoints /work/bench-ckpt [--spec base --spec large] [--dtype float32
        --dtype bfloat16 --dtype float16 --dtype int8 --dtype int4] [--repeats 5] [--threads 2] [--device cuda]
        [--cpu-tier avx2]

`--cpu-tier avx2` runs both sides as on a CPU without AVX-512 (on one that has it): florence2-rs with
FLORENCE2_CPU_TIER=avx2, torch with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL does torch's float32 products and ignores the other two). On a CPU whose
AVX-512 units are two 256-bit halves (AMD Zen 4) this is a fair stand-in for an AVX2 CPU of the same clock;
on one with full-width AVX-512 units it is not (AVX2 has half the peak rate of such units, on both sides).

`--dtype int8` / `int4` load florence2-rs with `BitsAndBytesConfig(load_in_8bit=True)` / `load_in_4bit=True`
in bfloat16, against transformers in plain bfloat16 (the fastest thing a transformers user runs on a CPU;
bitsandbytes is not part of the reference environment); their ids are compared for information, not for
equality (benches/quantize_report.py measures the quantized models' agreement). float16 runs float16 on both
sides.

With --device cuda both sides run on the GPU (florence2-rs must be a CUDA build): every timed call ends
with the results on the host (ours returns numpy arrays; transformers' side synchronizes the device), and
the peak RSS row is host memory only.

Run it with a Python that has transformers + torch and florence2_rs installed (the reference environment).
Missing checkpoints are built into --checkpoints first (about 1 GB for base, 3 GB for large, both layouts);
existing ones are reused. Prints one table of medians and the ratio transformers / florence2-rs per row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_FIXTURES = ROOT / "tests" / "fixtures" / "make_fixtures.py"
IMAGE_TOKEN = 51289  # `<image>` in the released HF-native vocabulary (image_token_id of the base/large specs)
IMAGE_TOKENS = 577
PROMPT = [0, 5, 9, 2]  # `<s>`, two prompt tokens, `</s>`: the length of a tokenized `<OD>` task prompt
DECODER_START = 2
SIDES = ("transformers", "florence2-rs")
QUANTIZED = ("int8", "int4")  # the --dtype values that quantize florence2-rs's weights


# -- the worker: one side, one checkpoint, one dtype, in its own process ----------------------------------

def _inputs(seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((1, 3, 768, 768), dtype=np.float32)
    input_ids = np.array([[IMAGE_TOKEN] * IMAGE_TOKENS + PROMPT], dtype=np.int64)
    return pixel_values, input_ids


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_time(fn, repeats: int) -> float:
    return statistics.median(_time(fn) for _ in range(repeats))


def _paired_times(long, short, repeats: int) -> tuple[float, float]:
    """The median of `long()`'s times and of its difference to `short()`'s, the two run in turn `repeats`
    times."""
    pairs = [(_time(long), _time(short)) for _ in range(repeats)]
    return statistics.median(a for a, _ in pairs), statistics.median(a - b for a, b in pairs)


def _load_transformers(path: Path, dtype: str, threads: int, device: str):
    import torch
    from transformers import Florence2ForConditionalGeneration

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, "bfloat16" if dtype in QUANTIZED else dtype)
    model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    if device != "cpu":
        torch.cuda.synchronize()

    def call(kind: str, ids, pixels, new_tokens: int):
        if kind == "generate":
            out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 num_beams=3, do_sample=False, min_new_tokens=new_tokens,
                                 max_new_tokens=new_tokens)
            return out[0].tolist()
        if kind == "vision":
            return model.model.vision_tower(pixels)
        return model(input_ids=ids, decoder_input_ids=torch.tensor([[DECODER_START]], device=device))

    def run(kind: str, pixel_values, input_ids, new_tokens: int = 0):
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(device)
            pixels = torch.from_numpy(pixel_values).to(device, torch_dtype)
            out = call(kind, ids, pixels, new_tokens)
            if device != "cpu":
                torch.cuda.synchronize()  # the work is queued: count it all, as ours returns host arrays
            return out

    return run


def _load_ours(path: Path, dtype: str, threads: int, device: str):
    import numpy as np
    from florence2_rs import BitsAndBytesConfig, Florence2ForConditionalGeneration

    if dtype in QUANTIZED:
        quantization = BitsAndBytesConfig(load_in_8bit=dtype == "int8", load_in_4bit=dtype == "int4")
        model = Florence2ForConditionalGeneration.from_pretrained(path, dtype="bfloat16", device_map=device,
                                                                  quantization_config=quantization)
    else:
        model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device)

    def run(kind: str, pixel_values, input_ids, new_tokens: int = 0):
        if kind == "generate":
            out = model.generate(input_ids=input_ids, pixel_values=pixel_values,
                                 attention_mask=np.ones_like(input_ids), num_beams=3, do_sample=False,
                                 min_new_tokens=new_tokens, max_new_tokens=new_tokens)
            return out[0].tolist()
        if kind == "vision":
            return model._state.native.vision_features(pixel_values)
        return model(input_ids=input_ids, decoder_input_ids=np.array([[DECODER_START]], dtype=np.int64))

    return run


def _rss_mib() -> float:
    """The resident memory of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(side: str, path: Path, dtype: str, threads: int, repeats: int, new_tokens: int, device: str) -> dict:
    import resource

    start = time.perf_counter()
    if side == "transformers":
        import torch  # noqa: F401  (the import is part of the cold start, not of the weights)
        import transformers  # noqa: F401
    else:
        import florence2_rs  # noqa: F401
    before = _rss_mib()
    run = (_load_transformers if side == "transformers" else _load_ours)(path, dtype, threads, device)
    weights = _rss_mib() - before
    cold = time.perf_counter() - start

    pixel_values, input_ids = _inputs()
    ids = run("generate", pixel_values, input_ids, new_tokens)  # warm-up, and the answer to compare
    generate, steps = _paired_times(lambda: run("generate", pixel_values, input_ids, new_tokens),
                                    lambda: run("generate", pixel_values, input_ids, 1), repeats)
    vision = _median_time(lambda: run("vision", pixel_values, input_ids), repeats)
    encoder = _median_time(lambda: run("encoder", pixel_values, input_ids), repeats)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "cold start (s)": cold,
        f"generate <OD> 3 beams {new_tokens} tokens (s)": generate,
        "vision tower (s)": vision,
        "encoder + 1 decoder position (s)": encoder,
        "decode step, 3 beams (ms)": 1000 * steps / (new_tokens - 1),
        "RSS added by from_pretrained (MiB)": weights,
        "peak RSS (MiB)": peak_kib / 1024,
        "_ids": ids,
    }


# -- the driver ---------------------------------------------------------------------------------------------

def ensure_checkpoint(root: Path, spec: str) -> Path:
    folder = root / spec / "hf"
    if not (folder / "model.safetensors").exists():
        print(f"building the {spec} checkpoint in {root} (transformers, random weights) ...", flush=True)
        subprocess.run([sys.executable, str(MAKE_FIXTURES), str(root), "--spec", spec], check=True)
    return folder


def run_side(side: str, path: Path, dtype: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(RAYON_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if args.cpu_tier == "avx2":
        env.update(FLORENCE2_CPU_TIER="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                   MKL_ENABLE_INSTRUCTIONS="AVX2")
    cmd = [sys.executable, __file__, "--worker", side, "--path", str(path), "--dtype", dtype,
           "--threads", threads, "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
           "--device", args.device]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    if device != "cpu":
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    family = fields.get("CPU family")
    return f"{name}, CPU family {family.strip()}" if family else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=Path("bench-checkpoints"),
                        help="where the random checkpoints are (built there when missing)")
    parser.add_argument("--spec", action="append", choices=("base", "large"), help="default: base")
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16") + QUANTIZED,
                        help="default: float32 and bfloat16; int8 / int4: ours quantized, theirs bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda[:N]", for both sides')
    parser.add_argument("--cpu-tier", choices=("native", "avx2"), default="native",
                        help="avx2: both sides limited to AVX2 (see above)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode step is a difference of two generate runs)")
    if args.worker:
        result = worker(args.worker, args.path, args.dtype[0], args.threads, args.repeats, args.new_tokens,
                        args.device)
        print(json.dumps(result))
        return

    specs = args.spec or ["base"]
    dtypes = args.dtype or ["float32", "bfloat16"]
    tier = ", both sides limited to AVX2" if args.cpu_tier == "avx2" else ""
    print(f"# {machine(args.device)}{tier}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}, median of {args.repeats}", flush=True)
    results = {}
    for spec in specs:
        path = ensure_checkpoint(args.checkpoints, spec)
        for dtype in dtypes:
            theirs, ours = (run_side(side, path, dtype, args) for side in SIDES)
            same = theirs.pop("_ids") == ours.pop("_ids")
            results[f"{spec} {dtype}"] = {"transformers": theirs, "florence2-rs": ours, "same ids": same}
            against = " against transformers' bfloat16" if dtype in QUANTIZED else ""
            print(f"\n## Florence-2-{spec} shape, {dtype}{against} (generated ids identical: {'yes' if same else 'no'})")
            print(f"| {'':40} | transformers | florence2-rs | ratio |")
            print(f"|{'-' * 42}|-------------:|-------------:|------:|")
            for key, value in theirs.items():
                print(f"| {key:40} | {value:12.3f} | {ours[key]:12.3f} | {value / ours[key]:5.2f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
