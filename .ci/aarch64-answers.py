"""The Python package on aarch64 against x86-64, on the small trained model (tests/fixtures/shapes) and held-out
synthetic scenes:

- float32: the generated ids and post-processed answers must be the ones the same package gives on this machine
  (which must be transformers').
- int8 and int4 linear layers (in float32): the linear layers give the same bits on both (the kernels' tests),
  but some of the float32 work around them does not (the attention's and convolutions' sums are ordered
  differently). A value that moves by its last bit can round to the next int8 level, a step of 1/254 of its
  row's largest value, which moves the next layer's values by far more than a bit, and so on, until a box
  moves by a bin or a word turns. So these are checked teacher-forced: fed this machine's generated ids, the
  next-token predictions must agree with this machine's at QUANTIZED_AGREEMENT of the positions or more. The
  check runs at FLORENCE2_CPU_TIER=dotprod, so that a CPU without the sdot kernel fails at load rather than
  passing on candle's Q8_0 matmul (which agrees with this scheme at 92 % here: a different scheme is not far
  off, a broken kernel would be).

Not bfloat16: on this model its ids follow the order of each sum's roundings (transformers' own bfloat16 answers
agree with its float32 ones on half of these scenes, and florence2-rs's bfloat16 answers at the avx2 and avx512
tiers of one CPU differ too).

    python .ci/aarch64-answers.py reference DIR    # x86-64, with torch and transformers: the scenes and answers
    python .ci/aarch64-answers.py check DIR        # aarch64 (under qemu), florence2_rs, numpy and Pillow only

`reference` renders the scenes into DIR (PNG, so that both sides read the same pixels whatever their Pillow
draws) and writes DIR/answers.json; `check` answers the same scenes and exits 1 on a failed check.
`.ci/aarch64` runs both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests" / "fixtures" / "shapes" / "hf"
SCENES_PER_TASK = 3
MAX_NEW_TOKENS = 64
# The least share of the quantized models' teacher-forced next-token predictions that must agree with x86-64's
# (measured on aarch64 under qemu: 97.7 % for int8, 100 % for int4).
QUANTIZED_AGREEMENT = 0.9
# dtype (model and inputs) and quantization, by the name the answers are filed under.
SETTINGS = {
    "float32": ("float32", None),
    "int8": ("float32", "load_in_8bit"),
    "int4": ("float32", "load_in_4bit"),
}


def answer(model, processor, case: dict, folder: Path, dtype, tensors: str = "np", forced=None) -> dict:
    """The generated ids, the post-processed answer, and the next-token predictions (argmax of the logits) fed
    `forced` ids (by default the generated ones) teacher-forced."""
    image = Image.open(folder / case["image"]).convert("RGB")
    inputs = processor(text=case["prompt"], images=image, return_tensors=tensors).to(dtype)
    ids = np.asarray(model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS))[0].tolist()
    text = processor.batch_decode([ids], skip_special_tokens=False)[0]
    parsed = processor.post_process_generation(text, task=case["task"], image_size=image.size)
    decoder = np.asarray([(forced or ids)[:-1]])
    if tensors == "pt":
        import torch

        decoder = torch.from_numpy(decoder)
    logits = model(**inputs, decoder_input_ids=decoder).logits
    logits = logits.float().numpy() if tensors == "pt" else np.asarray(logits)
    # Through JSON, as the file stores it: tuples become lists, floats keep their repr.
    return json.loads(json.dumps({"ids": ids, "answer": parsed, "predicted": logits[0].argmax(-1).tolist()}))


def ours(setting: str, cases: list[dict], folder: Path, forced: list | None = None) -> list[dict]:
    from florence2_rs import AutoProcessor, BitsAndBytesConfig, Florence2ForConditionalGeneration

    dtype, quantize = SETTINGS[setting]
    config = BitsAndBytesConfig(**{quantize: True}) if quantize else None
    model = Florence2ForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=dtype,
                                                              quantization_config=config)
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    forced = forced or [None] * len(cases)
    return [answer(model, processor, case, folder, dtype, forced=ids) for case, ids in zip(cases, forced)]


def reference(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import random

    import synthetic
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for task in synthetic.TASKS:
        for index in range(SCENES_PER_TASK):
            scene = synthetic.scene_for(task, "parity", index)
            name = f"{len(cases)}.png"
            synthetic.render(scene).save(folder / name)
            prompt = synthetic.example(scene, task, random.Random(0))[0]
            cases.append({"task": task, "prompt": prompt, "image": name})
    theirs = Florence2ForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    with torch.no_grad():
        transformers_f32 = [answer(theirs, processor, case, folder, torch.float32, "pt") for case in cases]
    answers = {setting: ours(setting, cases, folder) for setting in SETTINGS}
    if answers["float32"] != transformers_f32:
        sys.exit("reference: florence2-rs's float32 answers here are not transformers'")
    (folder / "answers.json").write_text(json.dumps({"cases": cases, "answers": answers}, indent=1))
    print(f"reference: {len(cases)} scenes x {len(SETTINGS)} settings into {folder}")


def check(folder: Path) -> None:
    import platform

    stored = json.loads((folder / "answers.json").read_text())
    cases, failed = stored["cases"], []
    for setting, want in stored["answers"].items():
        got = ours(setting, cases, folder, forced=[w["ids"] for w in want])
        same = sum(g["ids"] == w["ids"] and g["answer"] == w["answer"] for g, w in zip(got, want))
        pairs = [(g, w) for gs, ws in zip(got, want) for g, w in zip(gs["predicted"], ws["predicted"])]
        agreement = sum(g == w for g, w in pairs) / len(pairs)
        print(f"check ({platform.machine()}): {setting}: {same} of {len(cases)} generated answers as on x86-64;"
              f" {agreement:.1%} of {len(pairs)} teacher-forced predictions")
        if setting == "float32" and same < len(cases):
            failed.append(f"{setting}: {len(cases) - same} generated answers differ")
        if setting != "float32" and agreement < QUANTIZED_AGREEMENT:
            failed.append(f"{setting}: teacher-forced agreement {agreement:.1%} < {QUANTIZED_AGREEMENT:.0%}")
    if failed:
        sys.exit("check: " + "; ".join(failed))


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"reference": reference, "check": check}[mode](folder)
