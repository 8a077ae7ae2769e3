"""float16 and bfloat16 on a checkpoint whose activations leave the half-precision range unless computed as the
reference computes them: the stage-0 channel attention's unscaled scores (q·k summed over the 36864 tokens of a
768x768 image) exceed float16's 65504, while the scaled ones transformers forms (q scaled first) stay inside it.
Microsoft's checkpoints load as float16 by default (`torch_dtype: float16`), so this is the path users get.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import florence2_rs
import make_fixtures  # tests/fixtures, on sys.path through conftest.py
from safetensors.torch import save_file
from transformers import Florence2ForConditionalGeneration as HFModel

FLOAT16_MAX = 65504.0
# The tolerances of docs/architecture.md ("How parity is tested"):
# max |ours - transformers' f32| / max |transformers' f32|.
TOLERANCE = {"float16": 1e-2, "bfloat16": 6e-2}
# Added to the stage-0 channel attention's q and k biases: q·k then sums to about 36864 * 1.5² over the tokens.
QK_BIAS_SHIFT = 1.5


def channel_attention(model):
    return model.model.vision_tower.blocks[0][0].channel_block.channel_attn


@pytest.fixture(scope="module")
def large_activations(end_to_end_checkpoint, tmp_path_factory):
    """The end-to-end checkpoint with the stage-0 channel attention's q/k biases shifted, in both layouts
    (<folder>/hf, <folder>/original), and pixel values of one 768x768 image."""
    model = HFModel.from_pretrained(end_to_end_checkpoint / "hf").eval()
    attn = channel_attention(model)
    dim = attn.qkv.in_features
    with torch.no_grad():
        attn.qkv.bias[: 2 * dim] += QK_BIAS_SHIFT
    folder = tmp_path_factory.mktemp("large_activations")
    model.save_pretrained(folder / "hf", safe_serialization=True)
    n_vocab = model.config.image_token_id
    (folder / "original").mkdir()
    save_file(make_fixtures.original_state_dict(model, n_vocab), str(folder / "original" / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "original" / "config.json").write_text(
        json.dumps(make_fixtures.original_config(model.config, n_vocab)))
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(5))
    return folder, model, pixels


def raw_channel_scores(model, pixels) -> torch.Tensor:
    """The stage-0 channel attention's scores q·kᵀ over the tokens, before the N^-1/2 scale, in float32."""
    seen = {}
    attn = channel_attention(model)
    hook = attn.register_forward_hook(lambda module, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.model.vision_tower(pixels)
    hook.remove()
    x = seen["x"]
    b, n, c = x.shape
    groups = attn.groups
    qkv = attn.qkv(x).reshape(b, n, 3, groups, c // groups).permute(2, 0, 3, 4, 1)
    return qkv[0] @ qkv[1].transpose(-1, -2)


def max_relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_fixture_scores_leave_the_float16_range(large_activations):
    """The fixture is not too tame: unscaled scores overflow float16, scaled ones do not."""
    _, model, pixels = large_activations
    scores = raw_channel_scores(model, pixels)
    n = 192 * 192
    assert scores.abs().max().item() > FLOAT16_MAX
    assert (scores * n**-0.5).abs().max().item() < FLOAT16_MAX


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stays_finite_and_close(large_activations, dtype, layout):
    folder, reference, pixels = large_activations
    ids = torch.tensor([[0, 5, 9, 11, 2]])
    with torch.no_grad():
        image_features = reference.model.get_image_features(pixels).pooler_output.numpy()
        n_image = image_features.shape[1]
        hf_ids = torch.cat([torch.full((1, n_image), reference.config.image_token_id), ids], dim=1)
        logits = reference(input_ids=hf_ids, pixel_values=pixels,
                           decoder_input_ids=torch.tensor([[2, 0, 31]])).logits.numpy()
        half = HFModel.from_pretrained(folder / "hf", dtype=getattr(torch, dtype)).eval()
        half_features = half.model.get_image_features(pixels.to(half.dtype)).pooler_output.float().numpy()
    assert np.isfinite(half_features).all(), "transformers itself stays finite in this dtype"

    model = florence2_rs.Florence2ForConditionalGeneration.from_pretrained(folder / layout, dtype=dtype)
    ours = model.get_image_features(pixels.numpy()).pooler_output.astype(np.float32)
    assert np.isfinite(ours).all()
    assert max_relative_error(ours, image_features) <= TOLERANCE[dtype]
    # Microsoft's layout has no <image> placeholders and only the original vocabulary's logits.
    input_ids = hf_ids.numpy() if layout == "hf" else ids.numpy()
    out = model(input_ids=input_ids, pixel_values=pixels.numpy(), decoder_input_ids=np.array([[2, 0, 31]]))
    ours_logits = np.asarray(out.logits, np.float32)
    assert np.isfinite(ours_logits).all()
    assert max_relative_error(ours_logits, logits[..., : ours_logits.shape[-1]]) <= TOLERANCE[dtype]
    generated = model.generate(input_ids=input_ids, pixel_values=pixels.numpy(), max_new_tokens=8, num_beams=3)
    assert generated.shape[1] > 2 and (generated != reference.config.text_config.pad_token_id).sum() > 2
