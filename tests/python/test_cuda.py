"""The CUDA build on a GPU against transformers on the CPU: logits within float tolerance, identical ids
and post-processed results, both layouts, threads, and moving a model between devices.

Skipped where florence2-rs is a CPU build or torch sees no GPU (CI has neither). On a GPU machine:
`pytest tests/python/test_cuda.py` after installing a CUDA build (`maturin develop -r --features python,cuda`).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import skimage
import torch
from PIL import Image
from test_end_to_end import TASKS, assert_task_equals_transformers
from test_generation import SETTINGS, numpy_inputs, original_vocab_reference
from test_model_parity import max_rel_error

import florence2_rs
from transformers import AutoProcessor as HFProcessor
from transformers import Florence2ForConditionalGeneration as HFModel

pytestmark = [
    pytest.mark.skipif(not florence2_rs._native.CUDA_BUILD, reason="florence2-rs is a CPU build"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]
Model = florence2_rs.Florence2ForConditionalGeneration


def _inputs(ref, layout):
    """The reference inputs as numpy keywords (test_generation's, which drop the original layout's `<image>`s)."""
    ids, mask, pixels = numpy_inputs(ref, layout)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


@pytest.fixture(scope="module", params=["tiny", "tiny_uneven"])
def case(request, reference_checkpoints):
    from safetensors.torch import load_file

    folder = reference_checkpoints / request.param
    return folder, load_file(str(folder / "reference.safetensors"))


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_forward_on_cuda_matches_transformers(case, layout):
    folder, ref = case
    model = Model.from_pretrained(folder / layout, device_map="cuda")
    assert str(model.device) == "cuda"
    out = model(**_inputs(ref, layout), decoder_input_ids=ref["decoder_input_ids"].numpy())
    vocab = out.logits.shape[-1]
    assert max_rel_error(out.logits, ref["logits"][..., :vocab]) <= 1e-4
    assert max_rel_error(out.encoder_last_hidden_state, ref["encoder_out"]) <= 1e-4
    assert max_rel_error(out.image_hidden_states, ref["image_features"]) <= 1e-4


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("settings", SETTINGS[:4], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generate_on_cuda_equals_transformers(case, layout, settings):
    folder, ref = case
    if layout == "hf":
        reference = HFModel.from_pretrained(folder / "hf").eval()
    else:
        n_vocab = florence2_rs.Florence2Config.from_pretrained(folder / "original").text_config.vocab_size
        reference = original_vocab_reference(folder, n_vocab)
    with torch.no_grad():
        expected = reference.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                                      pixel_values=ref["pixel_values"], **settings).numpy()
    got = Model.from_pretrained(folder / layout, device_map="cuda").generate(**_inputs(ref, layout), **settings)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype,bound", [("bfloat16", 6e-2), ("float16", 1e-2)])
def test_half_precision_on_cuda_within_stated_bounds(case, dtype, bound):
    """The same bounds as on the CPU (test_model_parity.py)."""
    folder, ref = case
    model = Model.from_pretrained(folder / "hf", dtype=dtype, device_map="cuda")
    out = model(**_inputs(ref, "hf"), decoder_input_ids=ref["decoder_input_ids"].numpy())
    assert max_rel_error(out.logits, ref["logits"]) <= bound


def test_to_moves_between_devices_and_auto_picks_the_gpu(case):
    folder, ref = case
    inputs = dict(_inputs(ref, "hf"), decoder_input_ids=ref["decoder_input_ids"].numpy())
    model = Model.from_pretrained(folder / "hf")
    assert str(model.device) == "cpu"
    on_cpu = model(**inputs).logits
    model.to("cuda")
    assert str(model.device) == "cuda"
    assert max_rel_error(model(**inputs).logits, on_cpu) <= 1e-4
    model.to(torch.device("cpu"))
    np.testing.assert_array_equal(model(**inputs).logits, on_cpu)
    assert str(Model.from_pretrained(folder / "hf", device_map="auto").device) == "cuda"


def test_a_gpu_that_is_not_there_is_a_value_error(case):
    folder, _ = case
    with pytest.raises(ValueError, match="cannot open device"):
        Model.from_pretrained(folder / "hf", device_map=f"cuda:{torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def pair(end_to_end_checkpoint):
    folder = end_to_end_checkpoint / "hf"
    return (HFProcessor.from_pretrained(folder), HFModel.from_pretrained(folder).eval(),
            florence2_rs.AutoProcessor.from_pretrained(folder), Model.from_pretrained(folder, device_map="cuda"))


@pytest.mark.parametrize("prompt", TASKS)
def test_task_end_to_end_on_cuda_equals_transformers(pair, prompt):
    assert_task_equals_transformers(pair, prompt)


def test_threads_share_one_model_on_cuda(pair):
    """Several Python threads on one GPU model give the answers one call gives alone."""
    _, _, processor, model = pair
    images = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
    inputs = [processor(text="<OD>", images=image, return_tensors="np") for image in images]
    alone = [model.generate(**x, max_new_tokens=16, num_beams=3) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [model.generate(**inputs[i % 2], max_new_tokens=16, num_beams=3) for _ in range(2)]
        except Exception as err:  # noqa: BLE001 - reported below, with the thread it came from
            errors.append((i, err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 4
    for i, got in results.items():
        for ids in got:
            np.testing.assert_array_equal(ids, alone[i % 2])
