"""Quality of florence2-rs's quantized and half-precision models against its own float32 model, on one
full-size random-weight checkpoint (built by benches/compare.py or tests/fixtures/make_fixtures.py).

For each of several random 768x768 images and an `<OD>`-shaped prompt (as benches/compare.py), the float32
model makes a greedy and a 3-beam continuation of exactly N tokens. Every other variant then reports:

- teacher-forced top-1 agreement: fed float32's greedy continuation, the share of positions at which its
  most likely next token is float32's (the token float32 chose there);
- the largest logit error over those positions, relative to the largest float32 logit;
- greedy and beam ids: the share of generated positions equal to float32's, and of sequences equal in full;
- weights: the resident memory the load adds (MiB).

    python benches/quantize_report.py /work/bench-ckpt/base/hf [--images 4] [--new-tokens 64] [--threads 2]

Each variant runs in its own process. Prints the CPU (model and family) and one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# (dtype, quantize): float32 is the reference and runs first.
VARIANTS = (("float32", None), ("bfloat16", None), ("float32", "int8"), ("bfloat16", "int8"),
            ("float32", "int4"), ("bfloat16", "int4"))


def _settings(beams: int, new_tokens: int) -> dict:
    return {"num_beams": beams, "do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}


def worker(path: Path, dtype: str, quantize: str | None, images: int, new_tokens: int, out: Path,
           reference: Path | None, reference_features: bool) -> dict:
    import numpy as np
    from florence2_rs import _native

    sys.path.insert(0, str(Path(__file__).parent))
    from compare import _inputs, _rss_mib

    before = _rss_mib()
    model = _native.NativeModel.load(path, dtype, "cpu", quantize)
    weights = _rss_mib() - before
    greedy, beam, logits, all_features = [], [], [], []
    forced = np.load(reference) if reference else None
    for image in range(images):
        pixel_values, input_ids = _inputs(seed=image)
        if reference_features:
            features = forced["features"][image]
        else:
            features = model.get_image_features(pixel_values)[1]
        all_features.append(features)
        run = lambda beams: model.generate(input_ids, None, None, features, None,  # noqa: E731
                                           _settings(beams, new_tokens))["sequences"][0].tolist()
        greedy.append(run(1))
        beam.append(run(3))
        # Teacher forcing on float32's greedy sequence (decoder start token first; this variant's own for the
        # reference): the logits at each position predict the token after it.
        sequence = forced["greedy"][image] if forced is not None else np.array(greedy[-1])
        decoder_ids = sequence[None, :-1].astype(np.int64)
        logits.append(model.forward(input_ids, decoder_ids, None, None, features)["logits"][0])
    np.savez(out, greedy=np.array(greedy), beam=np.array(beam), logits=np.array(logits),
             features=np.array(all_features))
    return {"weights (MiB)": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-features", action="store_true",
                        help="every variant's language model reads float32's image features (the vision tower "
                             "left out of the comparison)")
    args = parser.parse_args()
    if args.worker is not None:
        dtype, _, quantize = args.worker.partition(":")
        print(json.dumps(worker(args.path, dtype, quantize or None, args.images, args.new_tokens, args.out,
                                args.reference, args.reference_features)))
        return

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from compare import machine

    print(f"# {machine('cpu')}, {args.threads} threads; {args.path}; {args.images} images x "
          f"{args.new_tokens} tokens; against float32")
    print("| variant | weights (MiB) | teacher-forced top-1 | max logit error / max logit | greedy tokens | "
          "greedy sequences | beam tokens | beam sequences |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for dtype, quantize in VARIANTS:
            out = Path(tmp) / f"{dtype}-{quantize}.npz"
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, str(args.path), "--worker", f"{dtype}:{quantize or ''}",
                   "--images", str(args.images), "--new-tokens", str(args.new_tokens), "--out", str(out)]
            if reference is not None:
                cmd += ["--reference", str(reference)] + ["--reference-features"] * args.reference_features
            run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            weights = json.loads(run.stdout.strip().splitlines()[-1])["weights (MiB)"]
            if reference is None:
                reference, ref = out, np.load(out)
                print(f"| {dtype} (reference) | {weights:.0f} | | | | | | |", flush=True)
                continue
            got = np.load(out)
            top1 = float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).mean())
            error = float(np.abs(got["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max())
            cells = [f"{top1:.2%}", f"{error:.4f}"]
            for kind in ("greedy", "beam"):
                cells += [f"{(got[kind] == ref[kind]).mean():.2%}",
                          f"{(got[kind] == ref[kind]).all(axis=1).sum()}/{len(ref[kind])}"]
            label = f"{quantize} ({dtype} around it)" if quantize else dtype
            print(f"| {label} | {weights:.0f} | " + " | ".join(cells) + " |", flush=True)
    print("\nRandom weights say how far the arithmetic moves the outputs, not how a trained model's "
          "outliers fare.")


if __name__ == "__main__":
    main()
