"""generate() against transformers' generate on live random checkpoints: identical ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import florence2_rs
from transformers import Florence2ForConditionalGeneration as HFModel

SETTINGS = [
    dict(max_new_tokens=8),
    dict(max_new_tokens=12, num_beams=3, no_repeat_ngram_size=3),
    dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    dict(max_new_tokens=9, num_beams=2, early_stopping="never", min_new_tokens=5),
    dict(max_new_tokens=7, repetition_penalty=1.3, forced_bos_token_id=0, forced_eos_token_id=2),
    dict(max_length=9, num_beams=4, bad_words_ids=[[5], [9, 11]], suppress_tokens=[13]),
]


def original_vocab_reference(folder, n_vocab: int) -> HFModel:
    """transformers' model computing what Microsoft's original layout computes: the LM head cut to the
    original vocabulary. The HF-native layout has extra rows (`<image>`, padding to a multiple of 64) that
    take part in beam search's log-softmax, so generating over the full HF head is not the original model."""
    model = HFModel.from_pretrained(folder / "hf").eval()
    weight = model.lm_head.weight.detach()[:n_vocab].clone()
    model.lm_head = torch.nn.Linear(weight.shape[1], n_vocab, bias=False)
    model.lm_head.weight = torch.nn.Parameter(weight)
    return model


@pytest.fixture(scope="module", params=["tiny", "tiny_uneven"])
def case(request, reference_checkpoints):
    folder = reference_checkpoints / request.param
    ref = load_file(str(folder / "reference.safetensors"))
    n_vocab = florence2_rs.Florence2Config.from_pretrained(folder / "original").text_config.vocab_size
    references = {"hf": HFModel.from_pretrained(folder / "hf").eval(),
                  "original": original_vocab_reference(folder, n_vocab)}
    return folder, ref, references


def numpy_inputs(ref, layout):
    n = int(ref["n_image_tokens"][0])
    ids, mask = ref["input_ids"], ref["attention_mask"]
    if layout == "original":
        ids, mask = ids[:, n:], mask[:, n:]
    return ids.numpy(), mask.numpy(), ref["pixel_values"].numpy()


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_ids_equal_transformers(case, layout, settings):
    folder, ref, references = case
    with torch.no_grad():
        expected = references[layout].generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                               pixel_values=ref["pixel_values"], **settings).numpy()
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / layout)
    ids, mask, pixels = numpy_inputs(ref, layout)
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **settings)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_batched_equals_one_at_a_time(case):
    folder, ref, _ = case
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    ids, mask, pixels = numpy_inputs(ref, "hf")
    kwargs = dict(max_new_tokens=10, num_beams=3, no_repeat_ngram_size=3)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    for i in range(ids.shape[0]):
        keep = mask[i].astype(bool)
        single = model.generate(input_ids=ids[i : i + 1, keep], pixel_values=pixels[i : i + 1], **kwargs)
        row = batched[i][: single.shape[1]]
        np.testing.assert_array_equal(row, single[0])
        assert (batched[i][single.shape[1]:] == model.config.text_config.pad_token_id).all()


def test_cached_image_features_give_the_same_ids(case):
    folder, ref, _ = case
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "original")
    ids, mask, pixels = numpy_inputs(ref, "original")
    features = model.get_image_features(pixels).pooler_output
    for kwargs in SETTINGS[:3]:
        from_pixels = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
        from_features = model.generate(input_ids=ids, attention_mask=mask, image_features=features, **kwargs)
        np.testing.assert_array_equal(from_pixels, from_features)


def test_return_dict_scores_match_transformers(case):
    folder, ref, references = case
    hf = references["hf"]
    kwargs = dict(max_new_tokens=6, num_beams=3, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        expected = hf.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                               pixel_values=ref["pixel_values"], **kwargs)
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    got = model.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                         pixel_values=ref["pixel_values"], **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)
    assert len(got.scores) == len(expected.scores)
    for ours, theirs in zip(got.scores, expected.scores):
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(ours))
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


def test_settings_given_as_numpy_torch_tuples_and_sets_equal_plain_values(case):
    """Settings reach the native code as Python objects: numpy and torch scalars and arrays, tuples and sets
    mean what the plain values mean (transformers run with the plain values)."""
    folder, ref, references = case
    plain = dict(max_new_tokens=9, num_beams=3, length_penalty=0.5, early_stopping=True, do_sample=False,
                 bad_words_ids=[[5], [9, 11]], suppress_tokens=[13, 17], forced_eos_token_id=[2])
    given = dict(max_new_tokens=np.int64(9), num_beams=torch.tensor(3), length_penalty=np.float32(0.5),
                 early_stopping=np.bool_(True), do_sample=torch.tensor(False),
                 bad_words_ids=(np.array([5]), (9, 11)), suppress_tokens={17, 13}, forced_eos_token_id=np.array([2]))
    with torch.no_grad():
        expected = references["hf"].generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                                             pixel_values=ref["pixel_values"], **plain).numpy()
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    ids, mask, pixels = numpy_inputs(ref, "hf")
    np.testing.assert_array_equal(model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **given),
                                  expected)
    with pytest.raises(ValueError, match="`length_penalty` must be a finite number, but is nan"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, length_penalty=np.float64("nan"))
    with pytest.raises(ValueError, match="`length_penalty` must be a finite number, but is 1000"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, length_penalty=10**400)
    with pytest.raises(TypeError, match="`bad_words_ids` that is not a setting"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, bad_words_ids=[[object()]])
    # Inside a dict the error names the path to the value; a nested dict's int keys are read as json.dumps
    # writes them, so a config attribute such as `id2label` (ignored by generation) changes nothing.
    with pytest.raises(ValueError, match=r"`watermarking_config\.bias` must be a finite number, but is inf"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                       watermarking_config={"bias": float("inf")})
    with pytest.raises(TypeError, match=r"the keys of `watermarking_config\.extra` must be strings or ints"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                       watermarking_config={"extra": {(1, 2): 3}})
    config = transformers.GenerationConfig(**plain, id2label={0: "zero", 1: {2: "two"}})
    np.testing.assert_array_equal(
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=config), expected)


@pytest.mark.parametrize("bad,error", [
    (dict(max_new_tokens=0), ValueError),
    (dict(max_new_tokens=-3), ValueError),
    (dict(num_beams="three"), ValueError),
    (dict(num_beams=2, num_return_sequences=3), ValueError),
    (dict(not_a_setting=1), ValueError),
    (dict(temperature=object()), TypeError),
])
def test_bad_generate_kwargs_raise(case, bad, error):
    folder, ref, _ = case
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    ids, mask, pixels = numpy_inputs(ref, "hf")
    with pytest.raises(error):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **bad)
