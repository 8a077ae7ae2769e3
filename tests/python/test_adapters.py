"""PEFT LoRA adapters, made by peft itself on transformers' model, against peft's own model.

Each adapter is made with `init_lora_weights=False` (peft's default starts B at zero, which would make every
adapter the identity) on a random-weight checkpoint, saved with `save_pretrained`, and loaded here the ways a
user does: `from_pretrained(adapter_dir)`, `model.load_adapter`, `PeftModel.from_pretrained`. Logits must equal
peft's within float32 tolerance and generated ids exactly. Adapters trained on Microsoft's remote-code model
name its modules the original way; they are made here by renaming a transformers adapter's keys with the
fixtures' own HF-native -> original renames, and checked on the original-layout checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Florence2ForConditionalGeneration as HFModel  # noqa: E402

import florence2_rs  # noqa: E402
from florence2_rs import Florence2ForConditionalGeneration  # noqa: E402
from florence2_rs.peft import PeftModel  # noqa: E402

TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]
VISION_TARGETS = ["qkv", "proj", "fc2"]


def max_rel_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def base(reference_checkpoints):
    folder = reference_checkpoints / "tiny"
    return folder, load_file(str(folder / "reference.safetensors"))


def make_adapter(base_folder: Path, out: Path, seed: int = 0, **lora) -> "peft.PeftModel":
    """A LoRA adapter over transformers' model of `base_folder/hf`, saved to `out`; returns peft's model."""
    torch.manual_seed(seed)
    model = HFModel.from_pretrained(base_folder / "hf", dtype=torch.float32).eval()
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TEXT_TARGETS, "init_lora_weights": False} | lora
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**settings)).eval()
    peft_model.save_pretrained(out)
    return peft_model


def inputs(ref, layout: str = "hf") -> dict:
    n = int(ref["n_image_tokens"][0]) if layout == "original" else 0
    return {"input_ids": ref["input_ids"][:, n:].numpy(), "attention_mask": ref["attention_mask"][:, n:].numpy(),
            "pixel_values": ref["pixel_values"].numpy(), "decoder_input_ids": ref["decoder_input_ids"].numpy()}


def peft_logits(peft_model, ref) -> np.ndarray:
    with torch.no_grad():
        return peft_model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                          pixel_values=ref["pixel_values"], decoder_input_ids=ref["decoder_input_ids"]).logits.numpy()


def peft_ids(peft_model, ref, **settings) -> np.ndarray:
    with torch.no_grad():
        return peft_model.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                                   pixel_values=ref["pixel_values"], **settings).numpy()


def our_ids(model, ref, layout="hf", **settings) -> np.ndarray:
    x = inputs(ref, layout)
    x.pop("decoder_input_ids")
    return np.asarray(model.generate(**x, **settings))


GENERATE = {"max_new_tokens": 12, "num_beams": 2, "do_sample": False}


@pytest.mark.parametrize("lora", [
    {},
    {"target_modules": TEXT_TARGETS + VISION_TARGETS},
    {"target_modules": ["conv"]},  # the patch embeddings' strided convolutions
    {"use_rslora": True, "r": 8, "lora_alpha": 4},
    {"bias": "all"},
    {"modules_to_save": ["image_projection"]},
], ids=["text", "text+vision", "conv", "rslora", "bias_all", "modules_to_save"])
def test_adapter_matches_peft(base, tmp_path, lora):
    folder, ref = base
    peft_model = make_adapter(folder, tmp_path / "adapter", **lora)
    model = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "adapter", dtype="float32")
    logits = model(**inputs(ref)).logits
    assert max_rel_error(logits, peft_logits(peft_model, ref)) <= 1e-4
    np.testing.assert_array_equal(our_ids(model, ref, **GENERATE), peft_ids(peft_model, ref, **GENERATE))


def test_the_three_ways_of_loading_agree_and_adapters_switch(base, tmp_path):
    folder, ref = base
    first = make_adapter(folder, tmp_path / "a", seed=1)
    second = make_adapter(folder, tmp_path / "b", seed=2, target_modules=TEXT_TARGETS + VISION_TARGETS)
    want_a, want_b = peft_logits(first, ref), peft_logits(second, ref)
    x = inputs(ref)

    by_dir = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "a", dtype="float32")
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    plain = model(**x).logits
    model.load_adapter(tmp_path / "a")
    assert model.active_adapters() == ["default"]
    shim = PeftModel.from_pretrained(Florence2ForConditionalGeneration.from_pretrained(folder / "hf"), tmp_path / "a")
    for ours in (by_dir, model, shim):
        assert max_rel_error(ours(**x).logits, want_a) <= 1e-4

    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert model.active_adapters() == ["b"]  # the adapter loaded last is active, as in transformers
    assert max_rel_error(model(**x).logits, want_b) <= 1e-4
    model.set_adapter("default")
    assert max_rel_error(model(**x).logits, want_a) <= 1e-4
    model.set_adapter("b")
    model.disable_adapters()
    np.testing.assert_array_equal(model(**x).logits, plain)
    model.enable_adapters()
    assert max_rel_error(model(**x).logits, want_b) <= 1e-4
    with shim.disable_adapter():
        np.testing.assert_array_equal(shim(**x).logits, plain)
    assert shim.merge_and_unload() is shim.base_model
    model.to("bfloat16")  # a reload keeps the adapter
    assert max_rel_error(model(**x).logits, want_b) <= 6e-2
    model.delete_adapter("b")
    assert model.active_adapters() == ["default"]
    assert max_rel_error(model(**x).logits, want_a) <= 6e-2


def test_transformers_semantics_of_load_and_set(base, tmp_path):
    """The same calls on transformers' model with peft installed: the same active adapter after each."""
    folder, ref = base
    make_adapter(folder, tmp_path / "a", seed=1)
    make_adapter(folder, tmp_path / "b", seed=2)
    theirs = HFModel.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    ours = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    for model in (theirs, ours):
        model.load_adapter(str(tmp_path / "a"))
        model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert ours.active_adapters() == theirs.active_adapters()
    for model in (theirs, ours):
        model.set_adapter("default")
    assert ours.active_adapters() == theirs.active_adapters()
    for model in (theirs, ours):
        model.set_adapter("b")
    assert ours.active_adapters() == theirs.active_adapters()
    with torch.no_grad():
        want = theirs(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                      pixel_values=ref["pixel_values"], decoder_input_ids=ref["decoder_input_ids"]).logits.numpy()
    assert max_rel_error(ours(**inputs(ref)).logits, want) <= 1e-4
    for model in (theirs, ours):
        with pytest.raises(ValueError):
            model.set_adapter("missing")
        with pytest.raises(ValueError, match="already exists"):
            model.load_adapter(str(tmp_path / "a"), adapter_name="b")


def to_original_adapter(src: Path, dst: Path) -> None:
    """An HF-native adapter's tensors renamed the way Microsoft's remote-code model names its modules."""
    import make_fixtures

    shutil.copytree(src, dst)
    prefix = "base_model.model."
    renamed = {}
    for key, tensor in load_file(str(dst / "adapter_model.safetensors")).items():
        name = key[len(prefix):]
        module, _, factor = name.partition(".lora_")
        new = make_fixtures.to_original_key(module + ".weight")[: -len(".weight")]
        renamed[prefix + new + (".lora_" + factor if factor else "")] = tensor
    save_file(renamed, str(dst / "adapter_model.safetensors"))


@pytest.mark.parametrize("adapter_layout", ["hf", "original"])
def test_either_adapter_naming_on_the_original_checkpoint(base, tmp_path, adapter_layout):
    folder, ref = base
    peft_model = make_adapter(folder, tmp_path / "hf", target_modules=TEXT_TARGETS + VISION_TARGETS)
    adapter = tmp_path / "hf"
    if adapter_layout == "original":
        to_original_adapter(tmp_path / "hf", tmp_path / "original")
        adapter = tmp_path / "original"
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "original", dtype="float32")
    model.load_adapter(adapter)
    logits = model(**inputs(ref, "original")).logits
    want = peft_logits(peft_model, ref)[..., : np.asarray(logits).shape[-1]]
    assert max_rel_error(logits, want) <= 1e-4
    # And the original naming on the HF-native checkpoint.
    hf = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    hf.load_adapter(adapter)
    assert max_rel_error(hf(**inputs(ref)).logits, peft_logits(peft_model, ref)) <= 1e-4


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _bad_adapters():
    def dora(adapter, folder):
        make_adapter(folder, adapter, use_dora=True)

    def ia3(adapter, folder):
        model = HFModel.from_pretrained(folder / "hf", dtype=torch.float32)
        peft.get_peft_model(model, peft.IA3Config(target_modules=["q_proj", "fc1"],
                                                  feedforward_modules=["fc1"])).save_pretrained(adapter)

    def rank_pattern(adapter, folder):
        make_adapter(folder, adapter, rank_pattern={"q_proj": 2})

    def missing_weights(adapter, folder):
        make_adapter(folder, adapter)
        (adapter / "adapter_model.safetensors").unlink()

    def broken_config(adapter, folder):
        make_adapter(folder, adapter)
        (adapter / "adapter_config.json").write_text("{not json")

    def broken_weights(adapter, folder):
        make_adapter(folder, adapter)
        (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")

    def other_model(adapter, folder):  # tiny_uneven's widths: the factors do not fit tiny's layers
        make_adapter(folder.parent / "tiny_uneven", adapter)

    def unknown_module(adapter, folder):
        make_adapter(folder, adapter)
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        module = next(k for k in tensors if "layers.0." in k and "q_proj" in k).split(".lora_")[0]
        for key in [k for k in tensors if k.startswith(module + ".")]:
            tensors[key.replace("layers.0.", "layers.99.")] = tensors.pop(key)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))

    def huge_factors(adapter, folder):  # factors whose product would be 10^10 values: refused before it is made
        make_adapter(folder, adapter)
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        module = next(k for k in tensors if "q_proj" in k).split(".lora_")[0]
        tensors[module + ".lora_A.weight"] = torch.zeros(4, 100_000)
        tensors[module + ".lora_B.weight"] = torch.zeros(100_000, 4)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))

    def token_embedding(adapter, folder):
        make_adapter(folder, adapter, target_modules=["shared"])

    def lm_head(adapter, folder):
        make_adapter(folder, adapter, target_modules=["q_proj", "lm_head"])

    def no_base(adapter, folder):
        make_adapter(folder, adapter)
        _edit_config(adapter, base_model_name_or_path=None)

    return {
        "dora": (dora, OSError, "DoRA"),
        "ia3": (ia3, OSError, "IA3"),
        "rank_pattern": (rank_pattern, OSError, "rank_pattern"),
        "missing_weights": (missing_weights, FileNotFoundError, "adapter_model"),
        "broken_config": (broken_config, OSError, "adapter_config.json"),
        "broken_weights": (broken_weights, OSError, "safetensors"),
        "other_model": (other_model, OSError, "shape"),
        "unknown_module": (unknown_module, OSError, "match nothing"),
        "huge_factors": (huge_factors, OSError, "another model"),
        "token_embedding": (token_embedding, OSError, "token embedding"),
        "lm_head": (lm_head, OSError, "LM head"),
        "no_base": (no_base, OSError, "base_model_name_or_path"),
    }


@pytest.mark.parametrize("case", sorted(_bad_adapters()))
def test_bad_adapters_raise_clear_errors(reference_checkpoints, tmp_path, case):
    folder = reference_checkpoints / "tiny"
    make, error, message = _bad_adapters()[case]
    adapter = tmp_path / "adapter"
    make(adapter, folder)
    with pytest.raises(error, match=message):
        if case == "no_base":
            Florence2ForConditionalGeneration.from_pretrained(adapter)
        else:
            Florence2ForConditionalGeneration.from_pretrained(folder / "hf").load_adapter(adapter)


def test_training_is_refused_with_a_pointer(base, tmp_path):
    folder, _ = base
    make_adapter(folder, tmp_path / "a")
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf")
    with pytest.raises(ValueError, match="inference"):
        model.load_adapter(tmp_path / "a", is_trainable=True)
    with pytest.raises(NotImplementedError, match="train"):
        model.add_adapter(None)
    assert florence2_rs.Florence2ForConditionalGeneration is Florence2ForConditionalGeneration


def test_adapter_on_a_half_precision_base_loaded_in_float32(base, tmp_path):
    """A base stored in float16 (as Microsoft's are) and loaded in float32: the merged weight keeps the whole
    update (peft adds it to the upcast weight), not a float16 rounding of the sum."""
    folder, ref = base
    half = tmp_path / "half" / "hf"
    shutil.copytree(folder / "hf", half)
    weights = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              str(half / "model.safetensors"), metadata={"format": "pt"})
    peft_model = make_adapter(half.parent, tmp_path / "adapter", target_modules=TEXT_TARGETS + VISION_TARGETS)
    model = Florence2ForConditionalGeneration.from_pretrained(half, dtype="float32")
    model.load_adapter(tmp_path / "adapter")
    assert max_rel_error(model(**inputs(ref)).logits, peft_logits(peft_model, ref)) <= 1e-4


def our_logits(model, ref) -> np.ndarray:
    return np.asarray(model(**inputs(ref)).logits)


def test_concurrent_adapter_changes_keep_the_registry_and_the_weights_in_agreement(base, tmp_path):
    """Threads loading adapters into one model at once: afterwards the active adapter is the one whose weights
    run (in every trial), and set_adapter switches to the other. Each load must install its registry entry and
    its weights together, so that the active adapter is never one loaded over the other's weights: many trials,
    each started from a barrier so that the two loads overlap."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    folder, ref = base
    make_adapter(folder, tmp_path / "a", seed=1)
    make_adapter(folder, tmp_path / "b", seed=2, target_modules=TEXT_TARGETS + VISION_TARGETS)
    want = {name: our_logits(Florence2ForConditionalGeneration.from_pretrained(tmp_path / name, dtype="float32"),
                             ref) for name in ("a", "b")}
    assert max_rel_error(want["a"], want["b"]) > 1e-3  # the two adapters are told apart by their logits
    for trial in range(40):
        model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
        start = threading.Barrier(2)

        def load(name, model=model, start=start):
            start.wait()
            model.load_adapter(tmp_path / name, adapter_name=name)

        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(load, name) for name in ("a", "b")]:
                done.result(timeout=120)
        (active,) = model.active_adapters()
        np.testing.assert_array_equal(our_logits(model, ref), want[active], err_msg=f"trial {trial}: {active}")
        other = "b" if active == "a" else "a"
        model.set_adapter(other)
        assert model.active_adapters() == [other]
        np.testing.assert_array_equal(our_logits(model, ref), want[other], err_msg=f"trial {trial}: {other}")


@pytest.mark.parametrize("through", ["model", "views"])
def test_a_dtype_change_and_an_adapter_switch_at_once_give_both(base, tmp_path, through):
    """`to(dtype)` and `set_adapter` from two threads at once, on the model or on two of its views
    (`model.model`, `model.vision_tower`): the model ends in the new dtype with the new adapter, whichever ran
    first (neither reloads from the state the other is replacing)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    folder, ref = base
    make_adapter(folder, tmp_path / "a", seed=1)
    make_adapter(folder, tmp_path / "b", seed=2, target_modules=TEXT_TARGETS + VISION_TARGETS)
    want = our_logits(Florence2ForConditionalGeneration.from_pretrained(tmp_path / "b", dtype="bfloat16"), ref)
    for trial in range(25):
        model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
        model.load_adapter(tmp_path / "a", adapter_name="a")
        model.load_adapter(tmp_path / "b", adapter_name="b")
        model.set_adapter("a")
        start = threading.Barrier(2)

        def at_once(change, start=start):
            start.wait()
            change()

        casts, switches = (model, model) if through == "model" else (model.model, model.vision_tower)
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(at_once, lambda m=casts: m.to("bfloat16")),
                         pool.submit(at_once, lambda m=switches: m.set_adapter("b"))]:
                done.result(timeout=120)
        assert model.active_adapters() == ["b"] and str(model.dtype).endswith("bfloat16")
        np.testing.assert_array_equal(our_logits(model, ref), want, err_msg=f"trial {trial}")


def test_peft_model_load_adapter_finds_the_adapter_before_taking_the_lock(base, tmp_path, monkeypatch):
    """A Hub download may take long: PeftModel.load_adapter resolves the adapter with the model's lock free (other
    threads keep switching adapters meanwhile), then holds it only to load and switch back."""
    import threading

    import florence2_rs.adapters

    folder, ref = base
    make_adapter(folder, tmp_path / "a", seed=1)
    make_adapter(folder, tmp_path / "b", seed=2)
    shim = PeftModel.from_pretrained(Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32"),
                                     tmp_path / "a")
    lock, free, resolve = shim.base_model._state.lock, [], florence2_rs.adapters.resolve_adapter

    def resolving(*args, **kwargs):
        def try_lock():
            if lock.acquire(blocking=False):
                lock.release()
                free.append(True)
            else:
                free.append(False)
        other = threading.Thread(target=try_lock)
        other.start()
        other.join()
        return resolve(*args, **kwargs)

    monkeypatch.setattr(florence2_rs.adapters, "resolve_adapter", resolving)
    shim.load_adapter(tmp_path / "b", adapter_name="b")
    assert free == [True], "the model's lock was held while the adapter was resolved"
    assert shim.active_adapters == ["default"]
    shim.set_adapter("b")
    want = our_logits(Florence2ForConditionalGeneration.from_pretrained(tmp_path / "b", dtype="float32"), ref)
    np.testing.assert_array_equal(our_logits(shim, ref), want)


def test_views_share_the_weights_and_the_adapters_with_their_model(base, tmp_path):
    """`model.model` and `model.vision_tower` are views over the model's own weights, as torch's submodules are:
    `.to()` and every adapter change made through a view is the model's too (and the other way round)."""
    folder, ref = base
    make_adapter(folder, tmp_path / "a", seed=1)
    make_adapter(folder, tmp_path / "b", seed=2, target_modules=TEXT_TARGETS + VISION_TARGETS)
    want = {name: our_logits(Florence2ForConditionalGeneration.from_pretrained(tmp_path / name, dtype="bfloat16"),
                             ref) for name in ("a", "b")}

    # The reference: in transformers, casting model.model casts the parent's parameters (the same tensors).
    theirs = HFModel.from_pretrained(folder / "hf", dtype=torch.float32)
    theirs.model.to(torch.bfloat16)
    assert theirs.dtype == torch.bfloat16

    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    model.load_adapter(tmp_path / "a", adapter_name="a")
    view, tower = model.model, model.vision_tower
    view.to("bfloat16")
    assert model.dtype == tower.dtype == model.model.dtype == torch.bfloat16
    np.testing.assert_array_equal(our_logits(model, ref), want["a"])

    view.load_adapter(tmp_path / "b", adapter_name="b")
    assert model.active_adapters() == tower.active_adapters() == ["b"]
    np.testing.assert_array_equal(our_logits(model, ref), want["b"])
    tower.set_adapter("a")
    assert model.active_adapters() == ["a"]
    np.testing.assert_array_equal(our_logits(model, ref), want["a"])

    tower.delete_adapter("a")
    assert model.active_adapters() == view.active_adapters() == ["b"]
    model.disable_adapters()
    model.enable_adapters()
    np.testing.assert_array_equal(our_logits(model, ref), want["b"])
    with pytest.raises(ValueError, match="already exists"):
        model.load_adapter(tmp_path / "b", adapter_name="b")  # the name a view loaded is taken

    view.delete_adapter("b")
    for call in (model.disable_adapters, model.enable_adapters, model.active_adapters):
        with pytest.raises(ValueError, match="No adapter loaded"):
            call()
    model.to("float32")
    assert view.dtype == torch.float32
    plain = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    np.testing.assert_array_equal(our_logits(model, ref), our_logits(plain, ref))
