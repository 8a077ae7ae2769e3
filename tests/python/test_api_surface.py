"""The public surface: the names transformers' Florence-2 page documents, docstrings on every public name, the
native stubs matching the native module, from_pretrained's keywords, and the documented output fields."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

import florence2_rs
from florence2_rs import _native
from florence2_rs.quantization import quantize_mode

# The classes and functions the transformers Florence-2 page documents or uses in its examples.
DOCUMENTED = ["Florence2Config", "Florence2VisionConfig", "Florence2Processor", "Florence2Model",
              "Florence2ForConditionalGeneration", "Florence2VisionBackbone", "AutoProcessor", "GenerationConfig",
              "BatchFeature", "BitsAndBytesConfig", "pipeline"]


def test_documented_names_are_exported():
    missing = [name for name in DOCUMENTED if name not in florence2_rs.__all__]
    assert not missing
    for name in florence2_rs.__all__:
        assert hasattr(florence2_rs, name), name


# Exported names that transformers spells otherwise: the processor's two parts (transformers' Florence-2
# processor holds a CLIPImageProcessor and a BartTokenizer), and the package's own exception.
OWN_SPELLINGS = {"Florence2ImageProcessor": "CLIPImageProcessor", "Florence2Tokenizer": "BartTokenizer",
                 "Florence2Error": None}


def test_top_level_exports_transformers_names_only():
    """The top level is the drop-in: the applications (`florence2_rs.apps`) and the server
    (`florence2_rs.serve`) are imported from their own modules, and `import florence2_rs` loads neither."""
    import transformers

    for name in florence2_rs.__all__:
        counterpart = OWN_SPELLINGS.get(name, name)
        assert counterpart is None or hasattr(transformers, counterpart), f"{name} is no transformers name"
    loaded = subprocess.run([sys.executable, "-c", "import sys, florence2_rs; print(*sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(("florence2_rs.apps", "florence2_rs.serve"))]


def _public_members(cls):
    """Public methods and properties of `cls` defined in florence2_rs (not those inherited from dict & co.)."""
    for owner in cls.__mro__:
        if not owner.__module__.startswith("florence2_rs."):
            continue
        for name, member in vars(owner).items():
            if name.startswith("_") and name != "__call__":
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                yield name, member


def test_every_public_name_has_a_docstring():
    undocumented = []
    for name in florence2_rs.__all__:
        obj = getattr(florence2_rs, name)
        if not (obj.__doc__ or "").strip():
            undocumented.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("florence2_rs.") and obj is not _native.Florence2Error:
            for member_name, member in _public_members(obj):
                if member_name == "__call__" and member is getattr(obj, "forward", None):
                    continue  # `__call__ = forward`
                if not (member.__doc__ or "").strip():
                    undocumented.append(f"{name}.{member_name}")
    assert not undocumented


def test_native_stub_declares_what_the_module_has():
    stub = ast.parse((Path(florence2_rs.__file__).parent / "_native.pyi").read_text())
    declared = {node.name: node for node in stub.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    constants = {node.target.id for node in stub.body if isinstance(node, ast.AnnAssign)}
    public = {name for name in dir(_native) if not name.startswith("_")}
    assert public == set(declared) | constants
    for class_name in ("NativeModel", "ProcessorCore"):
        methods = {n.name for n in declared[class_name].body if isinstance(n, ast.FunctionDef)}
        native = {name for name in dir(getattr(_native, class_name)) if not name.startswith("_")}
        assert native == methods, class_name


def _stub_parameters(fn: ast.FunctionDef) -> tuple[list[str], list[str], set[str]]:
    """(positional parameters, keyword-only ones, those with a default) of a stub's def, `self` left out."""
    args = fn.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    positional = positional[1:] if positional[:1] == ["self"] else positional
    with_default = set(positional[len(positional) - len(args.defaults):]) if args.defaults else set()
    with_default |= {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
    return positional, [a.arg for a in args.kwonlyargs], with_default


def _native_parameters(obj) -> tuple[list[str], list[str], set[str]]:
    """The same of a native function or method, from the signature PyO3 gives it."""
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return ([p.name for p in params if p.kind in positional_kinds],
            [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY],
            {p.name for p in params if p.default is not inspect.Parameter.empty})


def test_native_stub_signatures_are_the_modules():
    """Every function and method the stub declares takes the parameters the native one takes: the same names
    in the same order, keyword-only where they are, with a default where they have one."""
    stub = ast.parse((Path(florence2_rs.__file__).parent / "_native.pyi").read_text())
    checked = 0
    for node in stub.body:
        owner, defs = (_native, [node]) if isinstance(node, ast.FunctionDef) else (None, [])
        if isinstance(node, ast.ClassDef):
            owner, defs = getattr(_native, node.name), [n for n in node.body if isinstance(n, ast.FunctionDef)]
        for fn in defs:
            native = getattr(owner, fn.name)
            if isinstance(native, property) or not callable(native):
                continue  # properties have no parameters
            assert _stub_parameters(fn) == _native_parameters(native), f"{getattr(owner, '__name__', '')}.{fn.name}"
            checked += 1
    assert checked >= 20


def test_package_ships_py_typed_and_stubs():
    package = Path(florence2_rs.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_native.pyi").is_file()


@pytest.fixture(scope="module")
def checkpoint(end_to_end_checkpoint):
    return end_to_end_checkpoint / "hf"


@pytest.fixture(scope="module")
def model(checkpoint):
    return florence2_rs.Florence2ForConditionalGeneration.from_pretrained(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def inputs(checkpoint):
    processor = florence2_rs.AutoProcessor.from_pretrained(checkpoint)
    return processor(text="<CAPTION>", images=Image.fromarray(skimage.data.coffee()), return_tensors="np")


def test_from_pretrained_accepts_transformers_keywords(checkpoint):
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(
        checkpoint, torch_dtype=torch.float16, device_map="auto", revision="main", token=None, cache_dir=None,
        local_files_only=False, force_download=False, attn_implementation="sdpa", trust_remote_code=True,
        low_cpu_mem_usage=True)
    assert model.dtype == torch.float16
    assert str(model.device) == ("cuda" if _native.cuda_available() else "cpu")  # "auto": GPU 0 if there is one


def test_quantization_config_is_accepted_and_mapped(checkpoint):
    config = florence2_rs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                             bnb_4bit_quant_type="nf4")
    assert config.bnb_4bit_compute_dtype == "bfloat16" and config.quantization_method() == "nf4"
    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(checkpoint, quantization_config=config)
    assert model._state.quantize == "int4"
    with pytest.raises(ValueError, match="only one"):
        florence2_rs.BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("config, mode", [
    (None, None), ({"load_in_8bit": True}, "int8"), ({"load_in_4bit": True}, "int4"),
])
def test_quantize_mode(config, mode):
    assert quantize_mode(config) == mode
    if config is not None:
        assert quantize_mode(florence2_rs.BitsAndBytesConfig(**config)) == mode

@pytest.mark.parametrize("config", [florence2_rs.BitsAndBytesConfig(), {"quant_method": "bitsandbytes"}],
                         ids=["config", "dict"])
def test_quantize_mode_refuses_a_config_without_a_flag(config):
    """transformers sends a bitsandbytes config that sets neither flag to its 4-bit quantizer: refused here, not
    loaded unquantized."""
    with pytest.raises(ValueError, match="sets neither load_in_8bit nor load_in_4bit.*load_in_4bit=True"):
        quantize_mode(config)


def test_quantize_mode_reads_transformers_own_config():
    from transformers import BitsAndBytesConfig

    assert quantize_mode(BitsAndBytesConfig(load_in_8bit=True)) == "int8"


@pytest.mark.parametrize("auto_class, expected", [
    ("AutoModelForImageTextToText", "Florence2ForConditionalGeneration"),
    ("AutoModelForCausalLM", "Florence2ForConditionalGeneration"),
    ("AutoModel", "Florence2Model"),
])
def test_auto_classes_load_the_mapped_class(checkpoint, auto_class, expected):
    loaded = getattr(florence2_rs, auto_class).from_pretrained(checkpoint, trust_remote_code=True)
    assert type(loaded).__name__ == expected


def test_forward_outputs_have_the_documented_fields(model, inputs):
    out = model(**inputs)
    n_tokens = inputs["input_ids"].shape[1]
    assert out.logits.shape[:2] == (1, 1)
    assert out.encoder_last_hidden_state.shape[:2] == (1, n_tokens)
    assert out.image_hidden_states.shape[:2] == (1, 577)
    assert out.logits.dtype == np.float32

    base = model.model(**inputs)
    np.testing.assert_array_equal(base.encoder_last_hidden_state, out.encoder_last_hidden_state)
    np.testing.assert_array_equal(base.image_hidden_states, out.image_hidden_states)


def test_torch_in_gives_torch_out(model, inputs):
    tensors = {key: torch.from_numpy(value) for key, value in inputs.items()}
    out = model(**tensors)
    assert isinstance(out.logits, torch.Tensor) and isinstance(out.image_hidden_states, torch.Tensor)
    assert isinstance(model.generate(**tensors, max_new_tokens=3), torch.Tensor)


def test_vision_backbone_is_the_vision_tower(model, inputs):
    backbone = model.model.vision_tower
    assert isinstance(backbone, florence2_rs.Florence2VisionBackbone)
    assert isinstance(backbone.config, florence2_rs.Florence2VisionConfig)
    np.testing.assert_array_equal(backbone(inputs["pixel_values"]).last_hidden_state,
                                  model.get_image_features(inputs["pixel_values"]).last_hidden_state)


def test_model_surface(model):
    assert model.eval() is model
    assert isinstance(model.config, florence2_rs.Florence2Config)
    assert isinstance(model.generation_config, florence2_rs.GenerationConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.to("cpu") is model


def test_dtype_and_device_are_names_until_the_program_imports_torch(end_to_end_checkpoint):
    """A program that does not use torch reads `model.dtype` / `model.device` without importing it (about half a
    gigabyte); once it has imported torch it gets torch's dtype and device, as with transformers."""
    code = ("import sys\n"
            "from florence2_rs import Florence2ForConditionalGeneration\n"
            "model = Florence2ForConditionalGeneration.from_pretrained(sys.argv[1])\n"
            "print(repr(model.dtype), repr(str(model.device)), 'torch' in sys.modules)\n"
            "import torch\n"
            "print(model.dtype is torch.float32, model.device == torch.device('cpu'))\n")
    done = subprocess.run([sys.executable, "-c", code, str(end_to_end_checkpoint / "hf")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["'float32' 'cpu' False", "True True"]
