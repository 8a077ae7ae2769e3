"""The model through the Python API against transformers, live, on freshly built random checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import florence2_rs
from transformers import Florence2ForConditionalGeneration as HFModel

SPECS = ["tiny", "tiny_uneven"]


def max_rel_error(ours, theirs) -> float:
    ours = np.asarray(ours, dtype=np.float32)
    theirs = np.asarray(theirs, dtype=np.float32)
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module", params=SPECS)
def case(request, reference_checkpoints):
    spec = request.param
    folder = reference_checkpoints / spec
    reference = load_file(str(folder / "reference.safetensors"))
    return spec, folder, reference


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_forward_matches_transformers(case, layout):
    spec, folder, ref = case
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / layout)
    n = int(ref["n_image_tokens"][0])
    ids, mask = ref["input_ids"], ref["attention_mask"]
    if layout == "original":
        ids, mask = ids[:, n:], mask[:, n:]
    out = model(input_ids=ids.numpy(), pixel_values=ref["pixel_values"].numpy(), attention_mask=mask.numpy(),
                decoder_input_ids=ref["decoder_input_ids"].numpy())
    vocab = out.logits.shape[-1]
    assert max_rel_error(out.logits, ref["logits"][..., :vocab]) <= 1e-4
    assert max_rel_error(out.encoder_last_hidden_state, ref["encoder_out"]) <= 1e-4
    assert max_rel_error(out.image_hidden_states, ref["image_features"]) <= 1e-4
    feats = model.get_image_features(ref["pixel_values"].numpy())
    assert max_rel_error(feats.last_hidden_state, ref["vision_out"]) <= 1e-4
    assert max_rel_error(feats.pooler_output, ref["image_features"]) <= 1e-4


def test_torch_in_torch_out_and_default_decoder_start(case):
    spec, folder, ref = case
    hf = HFModel.from_pretrained(folder / "hf").eval()
    ours = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    inputs = dict(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], attention_mask=ref["attention_mask"])
    with torch.no_grad():
        expected = hf(**inputs).logits
    got = ours(**inputs).logits
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert max_rel_error(got, expected) <= 1e-4


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 6e-2), (torch.float16, 1e-2), ("bfloat16", 6e-2)])
def test_half_precision_within_stated_bounds(case, dtype, bound):
    spec, folder, ref = case
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype=dtype)
    assert str(model.dtype).endswith(str(dtype).replace("torch.", ""))
    out = model(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], attention_mask=ref["attention_mask"],
                decoder_input_ids=ref["decoder_input_ids"])
    assert out.logits.dtype == getattr(torch, str(dtype).replace("torch.", ""))  # torch in, model dtype out
    assert max_rel_error(out.logits.float(), ref["logits"]) <= bound


def test_dtype_auto_follows_the_config(case, tmp_path):
    spec, folder, _ = case
    import json
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(folder / "original", copy)
    config = json.loads((copy / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (copy / "config.json").write_text(json.dumps(config))
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(copy)
    assert model.dtype == torch.bfloat16
    assert florence2_rs.Florence2ForConditionalGeneration.from_pretrained(copy, dtype="float32").dtype == torch.float32
    model.to(torch.float16)
    assert model.dtype == torch.float16


@pytest.mark.skipif(florence2_rs._native.CUDA_BUILD, reason="a CUDA build: tests/python/test_cuda.py covers it")
def test_cuda_in_a_cpu_build_is_a_clear_error(case):
    _, folder, _ = case
    with pytest.raises(ValueError, match="CUDA build"):
        florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf", device_map="cuda")


def test_unknown_from_pretrained_kwarg_is_a_type_error(case):
    _, folder, _ = case
    with pytest.raises(TypeError, match="unexpected keyword"):
        florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf", colour="blue")


def test_florence2_model_last_hidden_state_matches_transformers(case):
    _, folder, ref = case
    hf = HFModel.from_pretrained(folder / "hf").eval()
    inputs = dict(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], attention_mask=ref["attention_mask"],
                  decoder_input_ids=ref["decoder_input_ids"])
    with torch.no_grad():
        expected = hf.model(**inputs)
    ours = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf").model(**inputs)
    assert max_rel_error(ours.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert max_rel_error(ours.encoder_last_hidden_state, expected.encoder_last_hidden_state) <= 1e-4


@pytest.mark.parametrize("tie", [None, False])
def test_original_layout_lm_head_follows_tie_word_embeddings(case, tmp_path, tie):
    """Microsoft's remote code ties the LM head to the token embedding after loading, unless the config says
    tie_word_embeddings=false (its configs leave it out: tied), whatever copy of the head the file stores."""
    _, folder, ref = case
    copy = tmp_path / "original"
    shutil.copytree(folder / "original", copy)
    weights = load_file(str(copy / "model.safetensors"))
    weights["language_model.lm_head.weight"] = torch.randn_like(weights["language_model.lm_head.weight"])
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    if tie is not None:
        config = json.loads((copy / "config.json").read_text())
        config["text_config"]["tie_word_embeddings"] = tie
        (copy / "config.json").write_text(json.dumps(config))
    n = int(ref["n_image_tokens"][0])
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(copy)
    logits = model(input_ids=ref["input_ids"][:, n:].numpy(), pixel_values=ref["pixel_values"].numpy(),
                   attention_mask=ref["attention_mask"][:, n:].numpy(),
                   decoder_input_ids=ref["decoder_input_ids"].numpy()).logits
    error = max_rel_error(logits, ref["logits"][..., :logits.shape[-1]])
    if tie is None:
        assert error <= 1e-4  # the stored head is ignored: the embedding is the head
    else:
        assert error > 0.1  # the stored (random) head is used


def loss_inputs(ref, layout):
    """The reference inputs (without the image placeholders in Microsoft's layout) and labels [2, 6] with
    -100 positions, their ids inside both layouts' vocabularies."""
    n = int(ref["n_image_tokens"][0])
    cut = n if layout == "original" else 0
    inputs = dict(input_ids=ref["input_ids"][:, cut:], pixel_values=ref["pixel_values"],
                  attention_mask=ref["attention_mask"][:, cut:])
    labels = torch.tensor([[0, 5, 9, 11, 2, -100], [0, 23, -100, 29, 2, -100]])
    return inputs, labels


@pytest.mark.parametrize("decoder", ["shifted labels", "explicit"])
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_loss_matches_transformers(case, layout, decoder):
    """transformers' loss on the HF-native layout. Microsoft's layout has no `<image>` row: its logits are
    transformers' over the vocabulary it keeps, and its remote code's loss is transformers' loss function
    (mean cross-entropy over the labels that are not -100) on those logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    _, folder, ref = case
    hf = HFModel.from_pretrained(folder / "hf").eval()
    ours = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / layout)
    inputs, labels = loss_inputs(ref, "hf")
    if decoder == "explicit":
        inputs["decoder_input_ids"] = torch.tensor([[2, 0, 31, 37, 3, 1], [2, 0, 41, 3, 1, 1]])
    with torch.no_grad():
        expected = hf(**inputs, labels=labels)
    ours_inputs, _ = loss_inputs(ref, layout)
    if decoder == "explicit":
        ours_inputs["decoder_input_ids"] = inputs["decoder_input_ids"]
    got = ours(**ours_inputs, labels=labels)
    vocab = got.logits.shape[-1]
    assert vocab == ours.config.text_config.vocab_size
    logits = expected.logits[..., :vocab]
    expected_loss = expected.loss if layout == "hf" else ForCausalLMLoss(logits, labels, vocab, shift_labels=labels)
    assert max_rel_error(got.logits, logits) <= 1e-4
    assert isinstance(got.loss, torch.Tensor) and got.loss.dtype == torch.float32 and got.loss.shape == ()
    assert abs(got.loss.item() - expected_loss.item()) <= 1e-4 * abs(expected_loss.item())
    assert got[0] is got.loss  # as transformers' output: the loss comes first


def test_loss_types_and_absence(case):
    """torch in: a 0-d float32 tensor, also from a bfloat16 model (the loss is computed in float32);
    numpy in: a numpy float32 scalar; no labels: None."""
    _, folder, ref = case
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    inputs, labels = loss_inputs(ref, "hf")
    numpy_inputs = {k: v.numpy() for k, v in inputs.items()}
    torch_loss = model(**inputs, labels=labels).loss
    numpy_loss = model(**numpy_inputs, labels=labels.numpy()).loss
    assert type(numpy_loss) is np.float32 and numpy_loss == torch_loss.item()
    assert model(**numpy_inputs, labels=labels.tolist()).loss == numpy_loss
    assert model(**inputs).loss is None and model(**numpy_inputs).loss is None
    half = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype=torch.bfloat16)
    half_loss = half(**inputs, labels=labels).loss
    assert half_loss.dtype == torch.float32 and half_loss.shape == ()
    assert abs(half_loss.item() - torch_loss.item()) <= 6e-2 * abs(torch_loss.item())


@pytest.mark.parametrize("num_items_in_batch", [None, 7, torch.tensor(4)])
@pytest.mark.parametrize("which", ["counted positions", "all -100"])
def test_loss_reduction_matches_transformers(case, num_items_in_batch, which):
    """The sum over num_items_in_batch where the Trainer passes it; no counted position: NaN (mean) or 0."""
    _, folder, ref = case
    hf = HFModel.from_pretrained(folder / "hf").eval()
    ours = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    inputs, labels = loss_inputs(ref, "hf")
    if which == "all -100":
        labels = torch.full_like(labels, -100)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    with torch.no_grad():
        expected = hf(**inputs, labels=labels, **extra).loss
    got = ours(**inputs, labels=labels, **extra).loss
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0, equal_nan=True)
