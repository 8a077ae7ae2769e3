"""Sampling follows the seeds users set: after `torch.manual_seed`, transformers' `set_seed` or
`florence2_rs.set_seed`, a script's sequence of `generate(do_sample=True)` calls repeats itself (as transformers'
does), while consecutive calls differ; `florence2_rs.set_seed` alone makes it repeat (torch blocked, or installed
but not imported yet), and the last seed set wins; an explicit `seed=` wins and leaves torch's generator alone.
The samples are florence2-rs' own (reproducible), not torch.multinomial's draws, so they are compared with
themselves, not with transformers'."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch_blocker
from safetensors.torch import load_file

import florence2_rs
import transformers
from florence2_rs import Florence2ForConditionalGeneration, GenerationConfig

# A high temperature over the random tiny model's 72-token vocabulary: samples that differ from call to call.
SAMPLE = dict(do_sample=True, max_new_tokens=12, temperature=2.0)


@pytest.fixture(scope="module")
def setup(reference_checkpoints):
    folder = reference_checkpoints / "tiny"
    ref = load_file(str(folder / "reference.safetensors"))
    inputs = {key: ref[key].numpy() for key in ("input_ids", "attention_mask", "pixel_values")}
    return folder, Florence2ForConditionalGeneration.from_pretrained(folder / "hf"), inputs


def _two_calls(model, inputs, **kwargs):
    return [model.generate(**inputs, **{**SAMPLE, **kwargs}) for _ in range(2)]


def _assert_repeats_and_varies(first, second):
    """Both runs of (generate, generate) equal, and the two calls of a run differ."""
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1]), "consecutive sampling calls gave the same ids"


@pytest.mark.parametrize("seed_with", ["torch.manual_seed", "transformers.set_seed", "florence2_rs.set_seed"])
def test_a_seeded_script_repeats_itself(setup, seed_with):
    _, model, inputs = setup
    seed = {"torch.manual_seed": torch.manual_seed, "transformers.set_seed": transformers.set_seed,
            "florence2_rs.set_seed": florence2_rs.set_seed}[seed_with]
    runs = []
    for _ in range(2):
        seed(1)
        runs.append(_two_calls(model, inputs))
    _assert_repeats_and_varies(*runs)


def test_another_seed_gives_other_samples(setup):
    _, model, inputs = setup
    torch.manual_seed(1)
    first = _two_calls(model, inputs)
    torch.manual_seed(2)
    second = _two_calls(model, inputs)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))


def test_florence2_set_seed_seeds_torch_too(setup):
    """transformers' set_seed seeds torch; so does ours, where torch is imported: torch's next draw repeats."""
    florence2_rs.set_seed(5)
    expected = torch.rand(3)
    transformers.set_seed(5)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_sampling_from_the_generation_config(setup):
    """do_sample set in a generation config (the caller's, or the model's own) follows the seed too."""
    _, model, inputs = setup
    config = GenerationConfig(do_sample=True, max_new_tokens=12, temperature=2.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append([model.generate(**inputs, generation_config=config) for _ in range(2)])
    _assert_repeats_and_varies(*runs)
    saved = model.generation_config.to_dict()
    try:
        model.generation_config.do_sample = True
        model.generation_config.temperature = 2.0
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append([model.generate(**inputs, max_new_tokens=12) for _ in range(2)])
    finally:
        model.generation_config = GenerationConfig(**saved)
    _assert_repeats_and_varies(*runs)


def test_an_explicit_seed_wins_and_leaves_torch_alone(setup):
    _, model, inputs = setup
    torch.manual_seed(1)
    a = model.generate(**inputs, **SAMPLE, seed=7)
    after_explicit = model.generate(**inputs, **SAMPLE)
    torch.manual_seed(2)
    b = model.generate(**inputs, **SAMPLE, seed=7)
    np.testing.assert_array_equal(a, b)
    torch.manual_seed(1)
    np.testing.assert_array_equal(model.generate(**inputs, **SAMPLE), after_explicit)


def test_greedy_calls_leave_torch_alone(setup):
    """Only sampling draws a seed: greedy and beam search consume nothing, as in transformers."""
    _, model, inputs = setup
    torch.manual_seed(4)
    model.generate(**inputs, max_new_tokens=5, num_beams=2)
    drawn = torch.rand(2)
    torch.manual_seed(4)
    np.testing.assert_array_equal(torch.rand(2), drawn)


def test_pipeline_sampling_repeats(end_to_end_checkpoint, tmp_path):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    pipe = florence2_rs.pipeline("image-text-to-text", model=str(end_to_end_checkpoint / "hf"))
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append([pipe(image, text="<CAPTION>", max_new_tokens=10, do_sample=True, temperature=2.0,
                          return_tensors=True)[0]["generated_token_ids"] for _ in range(2)])
    _assert_repeats_and_varies(*[[np.asarray(ids) for ids in run] for run in runs])


# A script run in a subprocess: {prelude} blocks torch or not, {seeding} seeds; the script writes the ids of
# (seeding; generate; generate), done twice, as JSON.
_SCRIPT = '''{prelude}
import json, sys
import numpy as np
import florence2_rs
model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained({folder!r})
inputs = dict(np.load({inputs!r}))
sample = {sample!r}
runs = []
for _ in range(2):
{seeding}
    runs.append([model.generate(**inputs, **sample).tolist() for _ in range(2)])
print("IDS" + json.dumps({{"runs": runs, "torch": "torch" in sys.modules}}))
'''


def _run_script(setup, tmp_path, seeding: str, block_torch: bool = False) -> dict:
    """Runs `_SCRIPT` with the seeding lines `seeding` in a fresh process; its report."""
    folder, _, inputs = setup
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = _SCRIPT.format(prelude=torch_blocker.PRELUDE if block_torch else "", folder=str(folder / "hf"),
                            inputs=str(tmp_path / "inputs.npz"), sample=SAMPLE,
                            seeding=textwrap.indent(textwrap.dedent(seeding).strip(), "    "))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("IDS"))[3:])
    report["runs"] = [[np.asarray(ids) for ids in run] for run in report["runs"]]
    return report


@pytest.mark.parametrize("block_torch", [True, False], ids=["torch blocked", "torch not imported"])
def test_set_seed_without_torch_imported(setup, tmp_path, block_torch):
    """florence2_rs.set_seed alone makes a script repeat itself; it imports torch where torch is installed (as
    transformers' set_seed does)."""
    report = _run_script(setup, tmp_path, "florence2_rs.set_seed(1)", block_torch)
    assert report["torch"] is not block_torch
    _assert_repeats_and_varies(*report["runs"])


def test_torch_manual_seed_after_set_seed_wins(setup, tmp_path):
    """The last seed set is the one sampling follows: set_seed(1) then torch.manual_seed(2) samples what
    torch.manual_seed(2) alone samples, in a process that had not imported torch before set_seed."""
    both = _run_script(setup, tmp_path, """
        florence2_rs.set_seed(1)
        import torch
        torch.manual_seed(2)
    """)
    alone = _run_script(setup, tmp_path, """
        import torch
        torch.manual_seed(2)
    """)
    for a, b in zip(both["runs"][0], alone["runs"][0]):
        np.testing.assert_array_equal(a, b)
    _assert_repeats_and_varies(*both["runs"])


def test_set_seed_refuses_what_is_not_an_integer():
    with pytest.raises(TypeError, match="integer"):
        florence2_rs.set_seed(1.5)
    for seed in (-1, 2 ** 32):
        with pytest.raises(ValueError, match="2\\*\\*32 - 1"):
            florence2_rs.set_seed(seed)


def test_an_out_of_range_seed_seeds_nothing():
    """The range is checked before any generator is seeded: a refused seed leaves them all as they were."""
    florence2_rs.set_seed(3)
    with pytest.raises(ValueError):
        florence2_rs.set_seed(2 ** 32)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    florence2_rs.set_seed(3)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
