"""Which modules of a LoRA adapter are merged: those peft wraps for the adapter's config (`target_modules` as a
list or a regex, `exclude_modules`, `layers_to_transform`), not every factor pair the file holds.

Each adapter is made by peft itself with broad `target_modules`, then its adapter_config.json is edited to
target fewer modules: peft's model loaded from that folder wraps only those (and reports the other factors as
unexpected keys); ours must give its logits and warn of the factors it leaves out.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402
from transformers import Florence2ForConditionalGeneration as HFModel  # noqa: E402

from florence2_rs import Florence2ForConditionalGeneration  # noqa: E402

BROAD = ["q_proj", "v_proj", "fc1", "qkv", "fc2"]


@pytest.fixture(scope="module")
def base(reference_checkpoints):
    folder = reference_checkpoints / "tiny"
    return folder, load_file(str(folder / "reference.safetensors"))


def _adapter(base_folder: Path, out: Path, **edits) -> Path:
    """A LoRA adapter over `BROAD`, saved by peft, with `edits` then written into its adapter_config.json."""
    torch.manual_seed(0)
    model = HFModel.from_pretrained(base_folder / "hf", dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=BROAD, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | edits))
    return out


def _peft_logits(base_folder: Path, adapter: Path, ref) -> np.ndarray:
    model = HFModel.from_pretrained(base_folder / "hf", dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's warning about the factors it leaves out
        peft_model = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return peft_model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"],
                          pixel_values=ref["pixel_values"], decoder_input_ids=ref["decoder_input_ids"]).logits.numpy()


def _our_logits(base_folder: Path, adapter: Path, ref):
    model = Florence2ForConditionalGeneration.from_pretrained(base_folder / "hf", dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_adapter(str(adapter))
    logits = model(input_ids=ref["input_ids"].numpy(), attention_mask=ref["attention_mask"].numpy(),
                   pixel_values=ref["pixel_values"].numpy(),
                   decoder_input_ids=ref["decoder_input_ids"].numpy()).logits
    return np.asarray(logits), [str(w.message) for w in caught if "target_modules" in str(w.message)]


NARROWED = {
    "list": {"target_modules": ["q_proj"]},
    "dotted_suffix": {"target_modules": ["self_attn.q_proj", "window_attn.qkv"]},
    "regex": {"target_modules": r".*encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"},
    "exclude_list": {"exclude_modules": ["fc1", "fc2"]},
    "exclude_regex": {"exclude_modules": r".*decoder.*"},
    "layers_to_transform": {"layers_to_transform": [1]},
    "layers_pattern": {"layers_to_transform": 0, "layers_pattern": "layers"},
}


@pytest.mark.parametrize("case", sorted(NARROWED))
def test_only_the_targeted_modules_are_merged(base, tmp_path, case):
    folder, ref = base
    adapter = _adapter(folder, tmp_path / case, **NARROWED[case])
    theirs = _peft_logits(folder, adapter, ref)
    ours, warned = _our_logits(folder, adapter, ref)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    # The whole adapter would give other logits: the narrowing is what is tested.
    full, _ = _our_logits(folder, _adapter(folder, tmp_path / "full"), ref)
    assert np.abs(full - theirs).max() > 1e-3 * np.abs(theirs).max()
    assert len(warned) == 1 and "left out" in warned[0], warned


def test_the_whole_file_targeted_gives_no_warning(base, tmp_path):
    folder, ref = base
    adapter = _adapter(folder, tmp_path / "all")
    ours, warned = _our_logits(folder, adapter, ref)
    np.testing.assert_allclose(ours, _peft_logits(folder, adapter, ref), rtol=0, atol=1e-4 * np.abs(ours).max())
    assert warned == []


@pytest.mark.parametrize("edits, message", [
    ({"peft_type": 7}, "peft_type 7"),
    ({"target_modules": r"(?<=self_attn\.)q_proj"}, "look-around"),
    ({"target_modules": None}, "target_modules"),
    ({"target_modules": 3}, "target_modules"),
])
def test_configs_peft_would_not_read_this_way_are_refused(base, tmp_path, edits, message):
    folder, _ = base
    adapter = _adapter(folder, tmp_path / "bad", **edits)
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    with pytest.raises(OSError, match=message):
        model.load_adapter(str(adapter))


# Every kind of setting peft reads to pick the modules it wraps, each with patterns that tell a correct reading
# apart from a near miss: a top-level `|` (peft splices the pattern into `re.match` / `re.fullmatch`, anchored
# as a whole), a `layers_pattern` list holding "" (used as it is, not the default).
TARGET_CONFIGS = {
    "list": {"target_modules": ["q_proj", "fc1", "qkv", "proj", "conv"]},
    "dotted_suffix": {"target_modules": ["self_attn.q_proj", "encoder_attn.v_proj", "window_attn.qkv",
                                         "window_attn.fn.qkv", "convs.1.conv", "convs.1.proj"]},
    "regex_with_bar": {"target_modules": r"fc1|.*\.(v_proj|qkv)|.*layers\.1\..*"},
    "exclude_list": {"target_modules": ["q_proj", "fc1", "fc2", "qkv"],
                     "exclude_modules": ["fc2", "encoder.layers.0.self_attn.q_proj"]},
    "exclude_regex_with_bar": {"target_modules": ["q_proj", "v_proj", "fc1", "qkv"],
                               "exclude_modules": r".*decoder.*|.*\.qkv"},
    "modules_to_save_with_bar": {"target_modules": ["q_proj", "fc2", "proj"], "modules_to_save": ["fc2|q_proj"]},
    "modules_to_save": {"target_modules": ["q_proj", "fc2", "proj"], "modules_to_save": ["self_attn", "lm_head"]},
    "layers_default": {"target_modules": ["q_proj", "fc1", "qkv", "proj", "conv"], "layers_to_transform": [1]},
    "layers_string": {"target_modules": ["q_proj", "fc1", "qkv", "proj", "conv"], "layers_to_transform": 0,
                      "layers_pattern": "layers"},
    "layers_list_with_bar": {"target_modules": ["q_proj", "fc1", "qkv", "proj", "conv"],
                             "layers_to_transform": [0, 1], "layers_pattern": ["blocks", "layers|convs"]},
    "layers_list_of_empty": {"target_modules": ["q_proj", "fc1", "qkv", "proj", "conv"],
                             "layers_to_transform": [0], "layers_pattern": [""]},
    "all_linear": {"target_modules": "all-linear"},
    "all_linear_exclude": {"target_modules": "all-linear", "exclude_modules": ["fc2", "qkv"]},
}


def _lora_modules(layout: str) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The modules of the tiny fixture in `layout` that LoRA can wrap (linear layers, and convolutions that are
    not grouped), with their weights' shapes; and the modules peft's "all-linear" takes.

    For transformers' layout both come from the model itself, the linear set from peft's
    `_maybe_include_all_linear_layers`. Microsoft's remote-code model is not built here: its modules are read
    from the weight names (a 2-D weight that is no embedding is a linear layer, a 4-D one a convolution), and
    its "all-linear" set is every linear layer but the output embeddings (`language_model.lm_head`), which is
    what peft's function takes on that model.
    """
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / layout
    if layout == "hf":
        model = HFModel.from_pretrained(fixture, dtype=torch.float32)
        shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear)
                  or (isinstance(module, torch.nn.Conv2d) and module.groups == 1)}
        config = peft.LoraConfig(target_modules="all-linear")
        linear = set(peft.tuners.tuners_utils._maybe_include_all_linear_layers(config, model).target_modules)
        return shapes, linear
    weights = load_file(str(fixture / "model.safetensors"))
    shapes = {}
    for key, tensor in weights.items():
        module = key.removesuffix(".weight")
        embedding = any(part in module for part in ("embed", "shared"))
        if key.endswith(".weight") and not embedding and (tensor.dim() == 2 or (tensor.dim() == 4
                                                                                 and tensor.shape[1] > 1)):
            shapes[module] = tuple(tensor.shape)
    linear = {m for m, shape in shapes.items() if len(shape) == 2} - {"language_model.lm_head"}
    return shapes, linear


@pytest.fixture(scope="module", params=["hf", "original"])
def lora_modules(request):
    return request.param, *_lora_modules(request.param)


@pytest.mark.parametrize("case", sorted(TARGET_CONFIGS))
def test_the_merged_modules_are_those_peft_wraps(lora_modules, tmp_path, case):
    """A factor pair for every module of the model (the LM head included); the modules merged are those peft's
    `check_target_module_exists` picks for the config, on both naming layouts."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from florence2_rs import _native

    layout, shapes, linear = lora_modules
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / layout
    rank = 2
    config = peft.LoraConfig(r=rank, lora_alpha=rank, **TARGET_CONFIGS[case])
    config.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for module, shape in shapes.items():
        a_shape = (rank, *shape[1:])
        b_shape = (shape[0], rank, *([1] * (len(shape) - 2)))
        factors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(a_shape, generator=generator) * 0.01
        factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(b_shape, generator=generator) * 0.01
    from safetensors.torch import save_file
    save_file(factors, str(tmp_path / "adapter_model.safetensors"))

    if config.target_modules == "all-linear":
        config.target_modules = linear
    expected = {module for module in shapes if check_target_module_exists(config, module)}
    # A config that targets nothing tests only that nothing is merged: peft reads [""] so.
    assert expected or case == "layers_list_of_empty"
    native = _native.NativeModel.load(str(fixture), "float32", "cpu", adapter=str(tmp_path))
    merged = set(shapes) - set(native.adapter_ignored_modules)
    assert sorted(merged) == sorted(expected)


def test_the_warning_of_left_out_factors_names_the_callers_line(base, tmp_path):
    folder, _ = base
    adapter = _adapter(folder, tmp_path / "narrow", target_modules=["q_proj"])
    model = Florence2ForConditionalGeneration.from_pretrained(folder / "hf", dtype="float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_adapter(str(adapter))
    [warning] = [w for w in caught if "left out" in str(w.message)]
    assert warning.filename == __file__
