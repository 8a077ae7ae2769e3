"""NativeModel.load(..., quantize="int8"|"int4"): the committed tiny checkpoint loads quantized, generates, and
stays close to the dense model; a bad value is a clear error. Full-size agreement: benches/quantize_report.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from florence2_rs import _native

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / "hf"


def _inputs():
    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((1, 3, 128, 128), dtype=np.float32)
    dense = _native.NativeModel.load(TINY, "float32", "cpu")
    n_image = dense.get_image_features(pixel_values)[1].shape[1]
    image_token = 70  # image_token_id of the tiny spec
    input_ids = np.array([[image_token] * n_image + [0, 5, 9, 2]], dtype=np.int64)
    return dense, pixel_values, input_ids


@pytest.mark.parametrize("quantize, bound", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_model_generates_close_to_dense(quantize, bound):
    dense, pixel_values, input_ids = _inputs()
    model = _native.NativeModel.load(TINY, "float32", "cpu", quantize=quantize)
    decoder_ids = np.array([[2, 0, 31, 37]], dtype=np.int64)
    want = dense.forward(input_ids, decoder_ids, None, pixel_values, None)["logits"]
    got = model.forward(input_ids, decoder_ids, None, pixel_values, None)["logits"]
    assert 0 < np.abs(got - want).max() / np.abs(want).max() < bound
    out = model.generate(input_ids, None, pixel_values, None, kwargs={"max_new_tokens": 8, "num_beams": 3})
    assert out["sequences"].shape[0] == 1


def test_unknown_quantization_is_an_error():
    with pytest.raises(Exception, match="int8"):
        _native.NativeModel.load(TINY, "float32", "cpu", quantize="int3")


def _int8_and_bf16_kernels() -> bool:
    """Whether this CPU has what the int8 kernel and the bf16 kernels need (AVX512-VNNI and AVX512-BF16)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return all(flag in flags for flag in ("avx512bw", "avx512_vnni", "avx512_bf16"))


def test_float16_on_the_cpu_is_the_float32_model():
    """CPUs have no float16 arithmetic: a float16 model computes in float32 over the same weights (float16
    values widen exactly), and reports the dtype it was asked for."""
    dense, pixel_values, input_ids = _inputs()
    half = _native.NativeModel.load(TINY, "float16", "cpu")
    assert half.dtype == "float16"
    decoder_ids = np.array([[2, 0, 31, 37]], dtype=np.int64)
    want = dense.forward(input_ids, decoder_ids, None, pixel_values, None)["logits"]
    got = half.forward(input_ids, decoder_ids, None, pixel_values, None)["logits"]
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not _int8_and_bf16_kernels(), reason="needs AVX512-VNNI and AVX512-BF16 (float32 elsewhere)")
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_float16_computes_in_bfloat16_on_the_cpu(quantize):
    """A quantized model asked for in float16 runs its quantized products around bfloat16 on a CPU with the
    kernels: the same logits as asking for bfloat16."""
    _, pixel_values, input_ids = _inputs()
    decoder_ids = np.array([[2, 0, 31, 37]], dtype=np.int64)
    logits = {}
    for dtype in ("float16", "bfloat16"):
        model = _native.NativeModel.load(TINY, dtype, "cpu", quantize=quantize)
        assert model.dtype == dtype
        logits[dtype] = model.forward(input_ids, decoder_ids, None, pixel_values, None)["logits"]
    np.testing.assert_array_equal(logits["float16"], logits["bfloat16"])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_embedding_refuses_ids_outside_the_vocabulary(quantize):
    model = _native.NativeModel.load(TINY, "float32", "cpu", quantize=quantize)
    with pytest.raises(ValueError, match="vocabulary"):
        model.forward(np.array([[0, 10**6, 2]], dtype=np.int64), np.array([[2]], dtype=np.int64), None, None,
                      None)


# quantization_config values transformers' from_pretrained refuses before it loads anything; florence2-rs must
# refuse each with the same exception type (transformers' message is kept at the start of ours where it has one).
REFUSED_LIKE_TRANSFORMERS = {  # name: (config, what our message must say)
    "load_in_4bit 'false'": ({"load_in_4bit": "false"}, "load_in_4bit must be a boolean"),
    "load_in_8bit 1.0": ({"load_in_8bit": 1.0}, "load_in_8bit must be a boolean"),
    "both flags": ({"load_in_8bit": True, "load_in_4bit": True}, "only one can be used"),
    "threshold an int": ({"load_in_8bit": True, "llm_int8_threshold": 6}, "llm_int8_threshold must be a float"),
    "skip modules a string": ({"load_in_4bit": True, "llm_int8_skip_modules": "lm_head"},
                              "llm_int8_skip_modules must be a list"),
    "empty dict": ({}, "no `quant_method`.*load_in_8bit=True or load_in_4bit=True"),
    "flags False": ({"load_in_8bit": False, "load_in_4bit": False}, "no `quant_method`"),
    "bitsandbytes without a flag": ({"quant_method": "bitsandbytes"}, "sets neither load_in_8bit nor load_in_4bit"),
    "unknown method": ({"quant_method": "int3"}, "quant_method 'int3' is not supported"),
    "a string": ("int8", "must be a BitsAndBytesConfig or a dict.*not str"),
    "a number": (8, "must be a BitsAndBytesConfig or a dict.*not int"),
}


def _transformers_refusal(config) -> type:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        transformers.Florence2ForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32,
                                                                       quantization_config=config)
    except Exception as err:  # noqa: BLE001 - the type is what is compared
        return type(err)
    pytest.fail(f"transformers accepted {config!r}")


@pytest.mark.parametrize("config, message", list(REFUSED_LIKE_TRANSFORMERS.values()),
                         ids=list(REFUSED_LIKE_TRANSFORMERS))
def test_quantization_configs_are_refused_as_transformers_refuses_them(config, message):
    from florence2_rs import Florence2ForConditionalGeneration

    expected = _transformers_refusal(config)
    with pytest.raises(Exception, match=message) as raised:
        Florence2ForConditionalGeneration.from_pretrained(TINY, quantization_config=config)
    assert type(raised.value) is expected, f"{type(raised.value).__name__}: {raised.value}"


@pytest.mark.parametrize("config", [
    {"quant_method": "gptq", "bits": 4}, {"quant_method": "awq", "bits": 4}, {"quant_method": "quanto"},
    {"quant_method": "torchao", "quant_type": "int4_weight_only"}, {"quant_method": "fp8"},
], ids=lambda c: c["quant_method"])
def test_other_quantization_methods_are_refused_not_ignored(config):
    """transformers runs these through their own packages (optimum, autoawq, quanto, torchao ...) and fails
    without them; florence2-rs never runs them: a ValueError that says so, never a model loaded unquantized."""
    from florence2_rs import Florence2ForConditionalGeneration

    with pytest.raises(ValueError, match=f"quant_method '{config['quant_method']}' is not supported"):
        Florence2ForConditionalGeneration.from_pretrained(TINY, quantization_config=config)


def test_transformers_config_objects_of_other_methods_are_refused():
    transformers = pytest.importorskip("transformers")
    from florence2_rs.quantization import quantize_mode

    with pytest.raises(ValueError, match="'gptq' is not supported"):
        quantize_mode(transformers.GPTQConfig(bits=4))
    assert quantize_mode(transformers.BitsAndBytesConfig(load_in_4bit=True)) == "int4"
    assert quantize_mode({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}) == "int4"
