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

With `--tasks`, on the small model this project trained (tests/fixtures/shapes), it measures answers instead:
over N held-out synthetic scenes per task (tests/fixtures/synthetic.py), with the checkpoint's own generation
settings (3 beams) through the public API (from_pretrained, the processor, generate, post_process_generation),
`<OD>` mAP@0.5 and the mean IoU of each true box with its best predicted box of the same name, `<OCR>` exact
matches and character error rate, `<CAPTION>` exact matches, and teacher-forced top-1 agreement with float32 on
float32's `<OD>` answers; float16 is one more variant there.

    python benches/quantize_report.py tests/fixtures/shapes/hf --tasks 200 [--threads 2]

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
TASK_VARIANTS = VARIANTS[:1] + (("float16", None),) + VARIANTS[1:]
SCORED_TASKS = ("<OD>", "<OCR>", "<CAPTION>")


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
    with open(out, "wb") as file:  # a file name would get ".npz" appended
        np.savez(file, greedy=np.array(greedy), beam=np.array(beam), logits=np.array(logits),
                 features=np.array(all_features))
    return {"weights (MiB)": weights}


def _synthetic():
    """tests/fixtures/synthetic.py, the held-out scenes and their scores."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    import synthetic

    return synthetic


def task_worker(path: Path, dtype: str, quantize: str | None, images: int, out: Path,
                reference: Path | None) -> dict:
    """Answers of one variant on the held-out scenes, and its top-1 tokens teacher-forced on float32's `<OD>`
    sequences (its own for float32), into `out` (JSON)."""
    import numpy as np
    from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration

    synthetic = _synthetic()
    flags = {"int8": {"load_in_8bit": True}, "int4": {"load_in_4bit": True}}
    model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                              quantization_config=flags.get(quantize))
    processor = AutoProcessor.from_pretrained(path)
    size = processor.image_processor.size["height"]
    forced = json.loads(reference.read_text())["sequences"] if reference else None
    result = {"answers": {task: [] for task in SCORED_TASKS}, "sequences": [], "top1": [], "size": size}
    for index in range(images):
        for task in SCORED_TASKS:
            image = synthetic.render(synthetic.scene_for(task, "quality", index, size))
            inputs = processor(text=task, images=image, return_tensors="np")
            ids = np.asarray(model.generate(**inputs, max_new_tokens=64))
            text = processor.batch_decode(ids, skip_special_tokens=False)[0]
            result["answers"][task].append(
                processor.post_process_generation(text, task=task, image_size=(size, size))[task])
            if task == "<OD>":
                sequence = np.asarray(forced[index] if forced else ids[0].tolist())
                logits = np.asarray(model(**inputs, decoder_input_ids=sequence[None, :-1]).logits)[0]
                result["sequences"].append(ids[0].tolist())
                result["top1"].append(logits.argmax(-1).tolist())
    out.write_text(json.dumps(result))
    return {}


def task_scores(result: dict, reference: dict, images: int) -> list[str]:
    import numpy as np

    synthetic = _synthetic()
    size = result["size"]
    scenes = {task: [synthetic.scene_for(task, "quality", i, size) for i in range(images)] for task in SCORED_TASKS}
    truths = [synthetic.truth(sc) for sc in scenes["<OD>"]]
    od = result["answers"]["<OD>"]
    ocr_true = [synthetic.example(sc, "<OCR>")[1] for sc in scenes["<OCR>"]]
    ocr = result["answers"]["<OCR>"]
    captions_true = [synthetic.caption(sc) for sc in scenes["<CAPTION>"]]
    top1 = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(result["top1"], reference["top1"])])
    return [f"{100 * synthetic.mean_average_precision(od, truths):.1f}", f"{synthetic.matched_iou(od, truths):.3f}",
            f"{np.mean([a == b for a, b in zip(ocr, ocr_true)]):.1%}",
            f"{np.mean([synthetic.character_error_rate(a, b) for a, b in zip(ocr, ocr_true)]):.3f}",
            f"{np.mean([a == b for a, b in zip(result['answers']['<CAPTION>'], captions_true)]):.1%}",
            f"{top1:.2%}"]


def each_variant(args: argparse.Namespace, variants, header: str, columns: list[str], worker_args: list[str],
                 reference_args: list[str] = ()):
    """Prints the CPU line and the table's head, then runs each variant's worker in its own process (the first,
    float32, is the reference the others get) and yields (label, its output file, the reference's, the last
    line the worker printed)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from compare import machine

    print(f"# {machine('cpu')}, {args.threads} threads; {args.path}; {header}")
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for dtype, quantize in variants:
            out = Path(tmp) / f"{dtype}-{quantize}"
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, str(args.path), "--worker", f"{dtype}:{quantize or ''}",
                   *worker_args, "--out", str(out)]
            if reference is not None:
                cmd += ["--reference", str(reference), *reference_args]
            run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            reference = reference or out
            label = f"{quantize} ({dtype} around it)" if quantize else dtype
            yield label, out, reference, (run.stdout.strip().splitlines() or [""])[-1]


def task_report(args: argparse.Namespace) -> None:
    columns = ["<OD> mAP@0.5", "<OD> box IoU", "<OCR> exact", "<OCR> CER", "<CAPTION> exact",
               "teacher-forced top-1 vs float32"]
    for label, out, reference, _ in each_variant(args, TASK_VARIANTS, f"{args.tasks} held-out scenes per task",
                                                 columns, ["--tasks", str(args.tasks)]):
        result = json.loads(out.read_text())
        print(f"| {label} | " + " | ".join(task_scores(result, json.loads(reference.read_text()), args.tasks))
              + " |", flush=True)


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
    parser.add_argument("--tasks", type=int, metavar="N",
                        help="score answers on N held-out synthetic scenes per task (the trained small model)")
    args = parser.parse_args()
    if args.worker is not None and args.tasks:
        dtype, _, quantize = args.worker.partition(":")
        task_worker(args.path, dtype, quantize or None, args.tasks, args.out, args.reference)
        return
    if args.tasks:
        task_report(args)
        return
    if args.worker is not None:
        dtype, _, quantize = args.worker.partition(":")
        print(json.dumps(worker(args.path, dtype, quantize or None, args.images, args.new_tokens, args.out,
                                args.reference, args.reference_features)))
        return

    import numpy as np

    columns = ["weights (MiB)", "teacher-forced top-1", "max logit error / max logit", "greedy tokens",
               "greedy sequences", "beam tokens", "beam sequences"]
    variants = each_variant(args, VARIANTS, f"{args.images} images x {args.new_tokens} tokens; against float32",
                            columns, ["--images", str(args.images), "--new-tokens", str(args.new_tokens)],
                            ["--reference-features"] * args.reference_features)
    for label, out, reference, line in variants:
        weights = json.loads(line)["weights (MiB)"]
        if out == reference:
            print(f"| {label} (reference) | {weights:.0f} | | | | | | |", flush=True)
            continue
        got, ref = np.load(out), np.load(reference)
        top1 = float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).mean())
        error = float(np.abs(got["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max())
        cells = [f"{top1:.2%}", f"{error:.4f}"]
        for kind in ("greedy", "beam"):
            cells += [f"{(got[kind] == ref[kind]).mean():.2%}",
                      f"{(got[kind] == ref[kind]).all(axis=1).sum()}/{len(ref[kind])}"]
        print(f"| {label} | {weights:.0f} | " + " | ".join(cells) + " |", flush=True)
    print("\nRandom weights say how far the arithmetic moves the outputs, not how a trained model's "
          "outliers fare.")


if __name__ == "__main__":
    main()
