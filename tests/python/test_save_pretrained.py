"""`Florence2ForConditionalGeneration.save_pretrained`: the folder it writes loads back in transformers and in
florence2-rs with identical generated ids and logits, for a plain model, one with a LoRA adapter merged, one
cast with `.to("bfloat16")`, one with an edited generation_config, sharded weights, and a quantized model (saved
unquantized); a model of Microsoft's layout is saved in its layout and loads back identically in florence2-rs
(Microsoft's remote code cannot run here). The saved tensors are compared with the source's as torch converts
them, bit for bit."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Florence2ForConditionalGeneration as HFModel

import florence2_rs
from florence2_rs import BitsAndBytesConfig, Florence2ForConditionalGeneration
from test_adapters import make_adapter, peft_ids

GENERATE = {"max_new_tokens": 12, "num_beams": 2, "do_sample": False}


@pytest.fixture(scope="module")
def case(reference_checkpoints):
    folder = reference_checkpoints / "tiny"
    ref = load_file(str(folder / "reference.safetensors"))
    return folder, ref


def _torch_inputs(ref) -> dict:
    return {key: ref[key] for key in ("input_ids", "attention_mask", "pixel_values")}


def _numpy_inputs(ref) -> dict:
    return {key: value.numpy() for key, value in _torch_inputs(ref).items()}


def _theirs(folder, ref, **settings):
    """transformers' model of `folder` (its dtype as saved): generated ids and the logits of one decoder pass."""
    model = HFModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ids = model.generate(**_torch_inputs(ref), **settings).numpy()
        logits = model(**_torch_inputs(ref), decoder_input_ids=ref["decoder_input_ids"]).logits.float().numpy()
    return ids, logits


def _ours(model, ref, **settings):
    ids = np.asarray(model.generate(**_numpy_inputs(ref), **settings))
    logits = model(**_numpy_inputs(ref), decoder_input_ids=ref["decoder_input_ids"].numpy()).logits
    return ids, np.asarray(logits, np.float32)


def _assert_same_tensors(saved_folder, expected: dict) -> None:
    saved = {}
    for file in sorted(saved_folder.glob("*.safetensors")):
        saved.update(load_file(str(file)))
    assert sorted(saved) == sorted(expected)
    for name, tensor in expected.items():
        assert saved[name].dtype == tensor.dtype, name
        assert torch.equal(saved[name], tensor), name


def test_saved_folder_loads_back_identically(case, tmp_path):
    folder, ref = case
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    _assert_same_tensors(tmp_path / "saved", load_file(str(folder / "hf" / "model.safetensors")))
    # transformers on the saved folder computes what it computes on the source folder, bit for bit.
    want_ids, want_logits = _theirs(folder / "hf", ref, **GENERATE)
    got_ids, got_logits = _theirs(tmp_path / "saved", ref, **GENERATE)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_logits, want_logits)
    # florence2-rs on the saved folder computes what the saved model computed.
    ids, logits = _ours(model, ref, **GENERATE)
    reloaded_ids, reloaded_logits = _ours(Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved"),
                                          ref, **GENERATE)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(reloaded_ids, ids)
    np.testing.assert_array_equal(reloaded_logits, logits)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == "florence2"


def test_a_merged_adapter_is_saved(case, tmp_path):
    folder, ref = case
    peft_model = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "fc1", "qkv"])
    model = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "adapter", dtype="float32")
    model.save_pretrained(tmp_path / "saved")
    want = peft_ids(peft_model, ref, **GENERATE)
    merged = peft_model.merge_and_unload().state_dict()
    source = load_file(str(folder / "hf" / "model.safetensors"))
    saved = {}
    for file in (tmp_path / "saved").glob("*.safetensors"):
        saved.update(load_file(str(file)))
    assert sorted(saved) == sorted(source)
    changed = [name for name in source if not torch.equal(source[name], merged[name])]
    assert changed  # the adapter changes weights
    for name in source:
        # peft merges in torch, florence2-rs in its own f32 product: equal to rounding.
        torch.testing.assert_close(saved[name], merged[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    theirs, _ = _theirs(tmp_path / "saved", ref, **GENERATE)
    np.testing.assert_array_equal(theirs, want)
    ids, logits = _ours(model, ref, **GENERATE)
    reloaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    reloaded_ids, reloaded_logits = _ours(reloaded, ref, **GENERATE)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(reloaded_ids, ids)
    np.testing.assert_array_equal(reloaded_logits, logits)


def test_to_bfloat16_saves_bfloat16(case, tmp_path):
    folder, ref = case
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf").to("bfloat16")
    model.save_pretrained(tmp_path / "saved")
    source = load_file(str(folder / "hf" / "model.safetensors"))
    _assert_same_tensors(tmp_path / "saved", {name: t.to(torch.bfloat16) for name, t in source.items()})
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = HFModel.from_pretrained(tmp_path / "saved")
    assert theirs.dtype == torch.bfloat16
    cast = HFModel.from_pretrained(folder / "hf", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        inputs = {**_torch_inputs(ref), "pixel_values": ref["pixel_values"].to(torch.bfloat16)}
        np.testing.assert_array_equal(theirs.eval().generate(**inputs, **GENERATE).numpy(),
                                      cast.generate(**inputs, **GENERATE).numpy())
    reloaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.dtype == torch.bfloat16
    np.testing.assert_array_equal(_ours(reloaded, ref, **GENERATE)[0], _ours(model, ref, **GENERATE)[0])


def test_an_edited_generation_config_is_what_the_folder_generates(case, tmp_path):
    folder, ref = case
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 9
    model.generation_config.no_repeat_ngram_size = 2
    model.save_pretrained(tmp_path / "saved")
    expected = np.asarray(model.generate(**_numpy_inputs(ref)))
    theirs = HFModel.from_pretrained(tmp_path / "saved").eval()
    assert theirs.generation_config.num_beams == 3
    with torch.no_grad():
        np.testing.assert_array_equal(theirs.generate(**_torch_inputs(ref)).numpy(), expected)
    reloaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(np.asarray(reloaded.generate(**_numpy_inputs(ref))), expected)


def test_sharded_save_and_a_save_over_an_earlier_one(case, tmp_path):
    folder, ref = case
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    out = tmp_path / "saved"
    model.save_pretrained(out)
    model.save_pretrained(out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    _assert_same_tensors(out, load_file(str(folder / "hf" / "model.safetensors")))
    want_ids, want_logits = _theirs(folder / "hf", ref, **GENERATE)
    got_ids, got_logits = _theirs(out, ref, **GENERATE)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_logits, want_logits)
    reloaded = Florence2ForConditionalGeneration.from_pretrained(out)
    np.testing.assert_array_equal(_ours(reloaded, ref, **GENERATE)[0], want_ids)
    # Saved again unsharded: the shards and their index go.
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_a_quantized_model_is_saved_unquantized_with_a_warning(case, tmp_path):
    folder, ref = case
    model = Florence2ForConditionalGeneration.from_pretrained(
        folder / "hf", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.warns(UserWarning, match="unquantized.*quantization_config"):
        model.save_pretrained(tmp_path / "saved")
    _assert_same_tensors(tmp_path / "saved", load_file(str(folder / "hf" / "model.safetensors")))
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    requantized = Florence2ForConditionalGeneration.from_pretrained(
        tmp_path / "saved", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    np.testing.assert_array_equal(_ours(requantized, ref, **GENERATE)[0], _ours(model, ref, **GENERATE)[0])


def test_what_cannot_be_saved_is_a_clear_error(case, tmp_path):
    folder, _ = case
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    with pytest.raises(NotImplementedError, match="upload_folder"):
        model.save_pretrained(tmp_path / "a", push_to_hub=True)
    with pytest.raises(NotImplementedError, match="safetensors"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(ValueError, match="loaded from"):
        model.save_pretrained(folder / "hf")
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "a", max_shard_size="5 parsecs")
    with pytest.raises(TypeError, match="unexpected"):
        model.save_pretrained(tmp_path / "a", shard_everything=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(tmp_path / "file")
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()
    assert florence2_rs.Florence2ForConditionalGeneration.save_pretrained.__doc__


def _original_inputs(ref) -> dict:
    """The inputs of Microsoft's layout: its processor leaves the `<image>` placeholders out."""
    n = int(ref["n_image_tokens"][0])
    return {"input_ids": ref["input_ids"][:, n:].numpy(), "attention_mask": ref["attention_mask"][:, n:].numpy(),
            "pixel_values": ref["pixel_values"].numpy()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_microsofts_layout_is_saved_in_its_layout(case, tmp_path, dtype):
    """A model of Microsoft's layout is saved in that layout (see save_pretrained), with its remote-code files and
    its generation settings in text_config, where its code reads them: florence2-rs loads it back identically."""
    folder, ref = case
    source = tmp_path / "source"
    shutil.copytree(folder / "original", source)
    (source / "modeling_florence2.py").write_text("# Microsoft's remote code\n")
    model = Florence2ForConditionalGeneration.from_pretrained(source).to(dtype)
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the code files are there to copy: nothing to warn about
        model.save_pretrained(tmp_path / "saved")
    stored = load_file(str(source / "model.safetensors"))
    _assert_same_tensors(tmp_path / "saved", {name: t.to(getattr(torch, dtype)) for name, t in stored.items()})
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "davit" and config["torch_dtype"] == dtype
    assert config["text_config"]["num_beams"] == 3 and config["text_config"]["max_new_tokens"] == 9
    assert (tmp_path / "saved" / "modeling_florence2.py").read_text() == "# Microsoft's remote code\n"
    reloaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.config.layout == "original" and reloaded.generation_config == model.generation_config
    inputs = _original_inputs(ref)
    np.testing.assert_array_equal(np.asarray(reloaded.generate(**inputs)), np.asarray(model.generate(**inputs)))
    decoder = ref["decoder_input_ids"].numpy()
    np.testing.assert_array_equal(np.asarray(reloaded(**inputs, decoder_input_ids=decoder).logits),
                                  np.asarray(model(**inputs, decoder_input_ids=decoder).logits))


def test_microsofts_layout_without_its_code_files_is_saved_with_a_warning(case, tmp_path):
    """Without remote-code files to copy, the folder is still saved in Microsoft's layout (florence2-rs loads it
    back), with a warning that transformers needs trust_remote_code and Microsoft's code files to load it."""
    folder, ref = case
    assert not list((folder / "original").glob("*.py"))
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "original")
    with pytest.warns(UserWarning, match="no remote-code files.*trust_remote_code=True and Microsoft's code files"):
        model.save_pretrained(tmp_path / "saved")
    reloaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.config.layout == "original"
    inputs = _original_inputs(ref)
    np.testing.assert_array_equal(np.asarray(reloaded.generate(**inputs)), np.asarray(model.generate(**inputs)))


@pytest.mark.parametrize("size", ["40 KB", " 40KB", "4_0 KB", "320Kb", 40_000, np.int64(40_000)])
def test_max_shard_size_reads_what_transformers_reads(case, tmp_path, size):
    """transformers' convert_file_size_to_int parses the number with int() (spaces and underscores pass); a
    lowercase "b" counts bits."""
    from transformers.utils.hub import convert_file_size_to_int

    folder, _ = case
    if not isinstance(size, np.integer):
        assert convert_file_size_to_int(size) == 40_000
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    model.save_pretrained(tmp_path / "saved", max_shard_size=size)
    assert len(list((tmp_path / "saved").glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("size", [2 ** 64, "18446744073709552KB", 0, -5, "5.5GB", "40 XB", True])
def test_a_max_shard_size_out_of_range_is_a_value_error(case, tmp_path, size):
    folder, _ = case
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "saved", max_shard_size=size)
    assert not (tmp_path / "saved").exists()


def test_a_model_loaded_from_pytorch_model_bin_is_saved_as_safetensors(case, tmp_path):
    folder, ref = case
    source = tmp_path / "bin"
    source.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(folder / "hf" / name, source / name)
    state = HFModel.from_pretrained(folder / "hf", dtype=torch.float32).state_dict()
    torch.save(state, source / "pytorch_model.bin")
    model = Florence2ForConditionalGeneration.from_pretrained(source)
    model.save_pretrained(tmp_path / "saved")
    _assert_same_tensors(tmp_path / "saved", {name: t.contiguous() for name, t in state.items()})
    want_ids, want_logits = _theirs(folder / "hf", ref, **GENERATE)
    got_ids, got_logits = _theirs(tmp_path / "saved", ref, **GENERATE)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_logits, want_logits)
    np.testing.assert_array_equal(
        _ours(Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved"), ref, **GENERATE)[0], want_ids)


def test_an_adapter_on_microsofts_layout_is_saved_merged(case, tmp_path):
    folder, ref = case
    make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "fc1", "qkv", "proj"])
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "original", dtype="float32")
    model.load_adapter(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "saved")
    stored = load_file(str(folder / "original" / "model.safetensors"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert sorted(saved) == sorted(stored)
    assert not torch.equal(saved["vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight"],
                           stored["vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight"])
    reloaded = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    inputs = _original_inputs(ref)
    decoder = ref["decoder_input_ids"].numpy()
    np.testing.assert_array_equal(np.asarray(reloaded.generate(**inputs, **GENERATE)),
                                  np.asarray(model.generate(**inputs, **GENERATE)))
    np.testing.assert_array_equal(np.asarray(reloaded(**inputs, decoder_input_ids=decoder).logits),
                                  np.asarray(model(**inputs, decoder_input_ids=decoder).logits))
