"""Client code people already run, with only the import switched: each client's inference call sequence,
run on florence2_rs and on transformers, every output compared.

The sequences are written here from reading each client's public code (not copied from it):

- autodistill-florence-2 (`Florence2.__init__`, `run_example`, `predict`): AutoModelForCausalLM /
  AutoProcessor with trust_remote_code, `<OD>`, generate with num_beams 3, early_stopping=False, then the
  ontology filter that builds its detections.
- roboflow maestro (`metrics.run_predictions` and `postprocess_florence2_output_for_mean_average_precision`,
  and the newer `inference.predict` with `padding=True`).
- jkawamoto/mcp-florence2 (`Florence2.__init__` and `generate`, behind its `ocr` and `caption` tools):
  Florence2ForConditionalGeneration with `dtype=`, AutoProcessor with clean_up_tokenization_spaces=True,
  inputs moved with `.to(device, dtype)`, the parsed answer stripped.
- kijai/ComfyUI-Florence2 (`Florence2Run.encode`): its IMAGE tensor (B×H×W×3 floats in [0, 1]) turned into
  PIL images with torchvision's `to_pil_image`, the processor called with `do_rescale=False`, generate with
  the node's settings, the special tokens cleaned from the text, post-processing with the image size.

What is substituted, and why: the Hub id becomes the local end-to-end checkpoint (released tokenizer and
768x768 processor files, tiny random weights) in both layouts; "cuda" / `mm.get_torch_device()` becomes the
CPU; `max_new_tokens` is cut from the clients' 1024 to MAX_NEW_TOKENS (see there). Packages the clients use
around these calls and that are not installed here (supervision's `Detections` and `MeanAveragePrecision`,
autodistill's `load_image`, torchvision's `to_pil_image`, ComfyUI's progress bar and model management) are
replaced by the few array operations they perform on our outputs, named in each sequence. ComfyUI samples
(`do_sample=True`, seeded with `set_seed`) by default; its sequence runs here with the node's
`do_sample=False` setting, because seeded sampling is not expected to draw transformers' samples.

The reference is transformers itself, fed the same sequence through a stand-in module: the HF-native layout
is transformers' Florence2ForConditionalGeneration on the same folder; Microsoft's layout (remote code, which
cannot run here) is transformers' model with the LM head cut to the original vocabulary and the generation
settings Microsoft's model reads from config.json's text_config (as in test_generation_defaults.py), with
transformers' processor of the HF-native folder called as Microsoft's remote-code processor calls its parts
(`_MicrosoftRouting`: only some image keywords reach the image processor; its ids carry the <image>
placeholders Microsoft's model prepends instead).
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import skimage  # noqa: E402
from PIL import Image  # noqa: E402

import florence2_rs  # noqa: E402
from test_generation import original_vocab_reference  # noqa: E402

# The generation settings Microsoft's Florence2LanguageConfig reads from text_config.
TEXT_GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "early_stopping", "forced_bos_token_id",
                        "forced_eos_token_id", "decoder_start_token_id", "bos_token_id", "eos_token_id",
                        "pad_token_id")


class _MicrosoftRouting:
    """transformers' processor called as Microsoft's remote-code `Florence2Processor.__call__` (its
    processing_florence2.py) calls its image processor and tokenizer: its signature (any other keyword is a
    TypeError), ``return_tensors`` "pt" by default, and only do_resize, do_normalize, image_mean, image_std,
    input_data_format, data_format, resample and do_convert_rgb handed to the image processor (a None left
    out: the transformers it was written for read it as the processor's setting); do_rescale, do_thumbnail,
    do_align_long_axis and tokenize_newline_separately change nothing. The ids keep transformers' <image>
    placeholders, which the reference model needs; the tests cut them off before comparing."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, text=None, images=None, tokenize_newline_separately=True, padding=False, truncation=None,
                 max_length=None, return_tensors="pt", do_resize=None, do_normalize=None, image_mean=None,
                 image_std=None, data_format="channels_first", input_data_format=None, resample=None,
                 do_convert_rgb=None, do_thumbnail=None, do_align_long_axis=None, do_rescale=None):
        image_options = dict(do_resize=do_resize, do_normalize=do_normalize, image_mean=image_mean,
                             image_std=image_std, input_data_format=input_data_format, data_format=data_format,
                             resample=resample, do_convert_rgb=do_convert_rgb)
        return self._processor(text=text, images=images, padding=padding, truncation=truncation,
                               max_length=max_length, return_tensors=return_tensors,
                               **{key: value for key, value in image_options.items() if value is not None})


def _reference_module(folder, layout: str) -> types.ModuleType:
    """A module with transformers' names the clients import, returning transformers' objects for `folder`."""
    hf = folder / "hf"

    def model(*args, **kwargs):
        if layout == "hf":
            built = transformers.Florence2ForConditionalGeneration.from_pretrained(hf)
        else:
            text = json.loads((folder / "original" / "config.json").read_text())["text_config"]
            n_vocab = florence2_rs.Florence2Config.from_pretrained(folder / "original").text_config.vocab_size
            built = original_vocab_reference(folder, n_vocab)
            built.generation_config.update(**{key: text[key] for key in TEXT_GENERATION_KEYS if key in text})
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return built.to(dtype) if dtype is not None else built

    def processor(*args, **kwargs):
        built = transformers.AutoProcessor.from_pretrained(hf)
        return built if layout == "hf" else _MicrosoftRouting(built)

    def loader(build):
        return type("Loader", (), {"from_pretrained": staticmethod(build)})

    module = types.ModuleType("transformers_reference")
    module.AutoModelForCausalLM = loader(model)
    module.Florence2ForConditionalGeneration = loader(model)
    module.AutoProcessor = loader(processor)
    module.set_seed = transformers.set_seed
    return module


# The clients generate up to 1024 tokens; the random weights seldom emit </s>, and 1024 steps of beam search
# per call take minutes in transformers on a CPU, so the length is cut (the same in both runs).
MAX_NEW_TOKENS = 24


def _run(source: str, library: str, scope: dict) -> dict:
    """Runs a client sequence with its transformers import switched to `library` and its max_new_tokens cut."""
    for old in ("from transformers import", "max_new_tokens=1024"):
        assert old in source, f"the sequence no longer contains {old!r}"
    source = source.replace("from transformers import", f"from {library} import")
    exec(source.replace("max_new_tokens=1024", f"max_new_tokens={MAX_NEW_TOKENS}"), scope)
    return scope


@pytest.fixture(params=["hf", "original"])
def layout(request):
    return request.param


@pytest.fixture
def both(end_to_end_checkpoint, layout, monkeypatch):
    """(run_ours, run_reference): each runs a sequence with MODEL_ID set to the layout's folder and returns
    its scope."""
    monkeypatch.setitem(sys.modules, "transformers_reference", _reference_module(end_to_end_checkpoint, layout))
    folder = str(end_to_end_checkpoint / layout)

    def runner(library):
        def run(source, **names):
            return _run(source, library, {"MODEL_ID": folder, **names})
        return run

    return runner("florence2_rs"), runner("transformers_reference")


def _images():
    rng = np.random.default_rng(4)
    return [
        Image.fromarray(skimage.data.astronaut()),
        Image.fromarray(skimage.data.coffee()),
        Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)),
    ]


def _assert_equal(got, want, path="output"):
    """Equal structures of dicts, lists, strings, numbers, numpy arrays and torch tensors."""
    if isinstance(want, torch.Tensor):
        want = want.numpy()
    if isinstance(got, torch.Tensor):
        got = got.numpy()
    if isinstance(want, np.ndarray):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=path)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), path
        for key in want:
            _assert_equal(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_equal(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


# --- autodistill-florence-2 ------------------------------------------------------------------------------

AUTODISTILL = '''
import numpy as np
from transformers import AutoProcessor, AutoModelForCausalLM

DEVICE = "cpu"


def run_example(task_prompt, processor, model, image, text_input=None):
    if text_input is None:
        prompt = task_prompt
    else:
        prompt = task_prompt + text_input
    inputs = processor(text=prompt, images=image, return_tensors="pt").to(DEVICE)
    generated_ids = model.generate(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        max_new_tokens=1024,
        early_stopping=False,
        do_sample=False,
        num_beams=3,
    )
    generated_text = processor.batch_decode(generated_ids, skip_special_tokens=False)[0]
    parsed_answer = processor.post_process_generation(
        generated_text, task=task_prompt, image_size=(image.width, image.height)
    )
    RECORD.append((inputs["input_ids"], generated_ids, generated_text, parsed_answer))
    return parsed_answer


model = AutoModelForCausalLM.from_pretrained(MODEL_ID, trust_remote_code=True, device_map=DEVICE).eval()
processor = AutoProcessor.from_pretrained(MODEL_ID, trust_remote_code=True, device_map=DEVICE)


def predict(image, ontology_classes, confidence=0.5):
    # `load_image(input, return_format="PIL")` gives the PIL image; supervision's Detections holds these
    # three arrays, and `detections[detections.confidence > confidence]` keeps the rows above the threshold.
    result = run_example("<OD>", processor, model, image)
    results = result["<OD>"]
    boxes_and_labels = list(zip(results["bboxes"], results["labels"]))
    xyxy = np.array([box for box, label in boxes_and_labels if label in ontology_classes]).reshape(-1, 4)
    class_id = np.array([ontology_classes.index(label) for box, label in boxes_and_labels if label in ontology_classes])
    confidence_values = np.array([1.0 for box, label in boxes_and_labels if label in ontology_classes])
    keep = confidence_values > confidence
    return xyxy[keep], class_id[keep], confidence_values[keep]


DETECTIONS = [predict(image, ONTOLOGY) for image in IMAGES]
'''


def _as_original_layout(ids, image_token_id):
    """transformers' HF-native input_ids as Microsoft's layout has them: without the <image> placeholders."""
    return ids[:, int((ids[0] == image_token_id).sum()):]


def test_autodistill_predict(both, layout):
    ours, theirs = both
    images = _images()
    # The tiny model's labels are random words: the ontology is made of the labels transformers' run finds
    # (and one it does not), so that the filter keeps some and drops others.
    probe = theirs(AUTODISTILL, IMAGES=images, ONTOLOGY=[], RECORD=[])
    labels = sorted({label for record in probe["RECORD"] for label in record[3]["<OD>"]["labels"]})
    ontology = labels[: max(1, len(labels) // 2)] + ["a class nobody predicts"]
    got = ours(AUTODISTILL, IMAGES=images, ONTOLOGY=ontology, RECORD=[])
    want = theirs(AUTODISTILL, IMAGES=images, ONTOLOGY=ontology, RECORD=[])
    if layout == "original":
        image_token_id = want["processor"].image_token_id
        want["RECORD"] = [(_as_original_layout(ids, image_token_id), *rest) for ids, *rest in want["RECORD"]]
    _assert_equal(got["RECORD"], want["RECORD"])
    _assert_equal(got["DETECTIONS"], want["DETECTIONS"])


# --- roboflow maestro ------------------------------------------------------------------------------------

MAESTRO = '''
import numpy as np
import torch
from transformers import AutoProcessor, AutoModelForCausalLM

device = torch.device("cpu")
model = AutoModelForCausalLM.from_pretrained(MODEL_ID, trust_remote_code=True).to(device)
processor = AutoProcessor.from_pretrained(MODEL_ID, trust_remote_code=True)


def run_predictions(dataset, processor, model, device):
    prompts, expected_responses, generated_texts, images = [], [], [], []
    for image, data in dataset:
        prefix = data["prefix"]
        suffix = data["suffix"]
        inputs = processor(text=prefix, images=image, return_tensors="pt").to(device)
        generated_ids = model.generate(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=1024, num_beams=3
        )
        generated_text = processor.batch_decode(generated_ids, skip_special_tokens=False)[0]
        prompts.append(prefix)
        expected_responses.append(suffix)
        generated_texts.append(generated_text)
        images.append(image)
    return prompts, expected_responses, generated_texts, images


def detections_from_florence_2(result, resolution_wh):
    # supervision's `Detections.from_lmm(sv.LMM.FLORENCE_2, result, resolution_wh=...)` for "<OD>": the boxes
    # as an (N, 4) float array and the labels as its "class_name" data.
    od = result["<OD>"]
    return np.array(od["bboxes"], dtype=np.float64).reshape(-1, 4), np.array(od["labels"], dtype=str)


def postprocess_for_mean_average_precision(expected_responses, generated_texts, images, classes, processor):
    targets, predictions = [], []
    for image, suffix, generated_text in zip(images, expected_responses, generated_texts):
        prediction = processor.post_process_generation(generated_text, task="<OD>", image_size=image.size)
        xyxy, class_name = detections_from_florence_2(prediction, image.size)
        keep = np.isin(class_name, classes)
        xyxy, class_name = xyxy[keep], class_name[keep]
        class_id = np.array([classes.index(name) for name in class_name])
        confidence = np.ones(len(xyxy))
        target = processor.post_process_generation(suffix, task="<OD>", image_size=image.size)
        target_xyxy, target_name = detections_from_florence_2(target, image.size)
        target_id = np.array([classes.index(name) for name in target_name])
        targets.append((prediction, target, target_xyxy, target_id))
        predictions.append((xyxy, class_id, confidence))
    return targets, predictions


PREDICTIONS = run_predictions(DATASET, processor, model, device)
TARGETS, DETECTIONS = postprocess_for_mean_average_precision(*PREDICTIONS[1:], CLASSES, processor)

# The newer maestro path (`inference.predict` / `predict_with_inputs`): one image, padding=True.
inputs = processor(text="<OD>", images=DATASET[0][0], return_tensors="pt", padding=True)
generated_ids = model.generate(
    input_ids=inputs["input_ids"].to(device),
    pixel_values=inputs["pixel_values"].to(device),
    max_new_tokens=1024,
    do_sample=False,
    num_beams=3,
)
PREDICT = processor.batch_decode(generated_ids, skip_special_tokens=False)[0]
'''


def test_maestro_run_predictions_and_map_postprocessing(both):
    ours, theirs = both
    images = _images()
    suffixes = ["car<loc_100><loc_200><loc_300><loc_400>person<loc_5><loc_6><loc_700><loc_800>",
                "cup<loc_0><loc_0><loc_999><loc_999>", "car<loc_10><loc_20><loc_30><loc_40>"]
    dataset = [(image, {"prefix": "<OD>", "suffix": suffix}) for image, suffix in zip(images, suffixes)]
    probe = theirs(MAESTRO, DATASET=dataset, CLASSES=["car", "cup", "person"])
    predicted = sorted({label for prediction, *_ in probe["TARGETS"] for label in prediction["<OD>"]["labels"]})
    classes = ["car", "cup", "person"] + predicted[:2]
    got = ours(MAESTRO, DATASET=dataset, CLASSES=classes)
    want = theirs(MAESTRO, DATASET=dataset, CLASSES=classes)
    for name in ("PREDICTIONS", "TARGETS", "DETECTIONS", "PREDICT"):
        _assert_equal(got[name], want[name], name)


# --- jkawamoto/mcp-florence2 -----------------------------------------------------------------------------

MCP_FLORENCE2 = '''
import torch
from transformers import AutoProcessor, Florence2ForConditionalGeneration


class Florence2:
    def __init__(self, model_id):
        self.device = "cpu"
        self.torch_dtype = torch.float32
        self.model = Florence2ForConditionalGeneration.from_pretrained(
            model_id, dtype=self.torch_dtype, trust_remote_code=True
        ).to(self.device)
        self.processor = AutoProcessor.from_pretrained(
            model_id, trust_remote_code=True, clean_up_tokenization_spaces=True
        )

    def ocr(self, images):
        return self.generate("<OCR>", images)

    def caption(self, images, level="<CAPTION>"):
        return self.generate(str(level), images)

    def generate(self, prompt, images):
        res = []
        for img in images:
            with img.convert("RGB") as rgb_img:
                inputs = self.processor(text=prompt, images=rgb_img, return_tensors="pt").to(
                    self.device, self.torch_dtype
                )
                generated_ids = self.model.generate(
                    input_ids=inputs["input_ids"],
                    pixel_values=inputs["pixel_values"],
                    max_new_tokens=1024,
                    num_beams=3,
                    do_sample=False,
                )
                generated_text = self.processor.batch_decode(generated_ids, skip_special_tokens=False)[0]
                parsed_answer = self.processor.post_process_generation(
                    generated_text, task=prompt, image_size=(rgb_img.width, rgb_img.height)
                )
                RECORD.append((generated_ids, generated_text, parsed_answer))
                res.append(parsed_answer[prompt].strip())
        return res


florence = Florence2(MODEL_ID)
OUTPUTS = {
    "ocr": florence.ocr(IMAGES),
    "caption": florence.caption(IMAGES),
    "detailed": florence.caption(IMAGES, "<DETAILED_CAPTION>"),
    "more_detailed": florence.caption(IMAGES, "<MORE_DETAILED_CAPTION>"),
}
'''


def test_mcp_florence2_tools(both):
    ours, theirs = both
    images = [image.convert("RGBA") for image in _images()[:2]]  # the tools take any PIL image and convert it
    got = ours(MCP_FLORENCE2, IMAGES=images, RECORD=[])
    want = theirs(MCP_FLORENCE2, IMAGES=images, RECORD=[])
    _assert_equal(got["RECORD"], want["RECORD"])
    _assert_equal(got["OUTPUTS"], want["OUTPUTS"])


# --- kijai/ComfyUI-Florence2 -----------------------------------------------------------------------------

COMFYUI = '''
import re
import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoModelForCausalLM

device = torch.device("cpu")
dtype = torch.float32
model = AutoModelForCausalLM.from_pretrained(MODEL_ID, attn_implementation="sdpa", device_map=device,
                                             torch_dtype=dtype, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(MODEL_ID, trust_remote_code=True)


def to_pil_image(pic):
    # torchvision.transforms.functional.to_pil_image of a 3×H×W float tensor: scaled by 255, cast to uint8
    # (truncating), made an RGB image.
    array = np.transpose(pic.mul(255).byte().cpu().numpy(), (1, 2, 0))
    return Image.fromarray(array, mode="RGB")


def encode(image, task_prompt, text_input="", num_beams=3, max_new_tokens=1024, do_sample=False):
    prompt = task_prompt + " " + text_input if text_input != "" else task_prompt
    image = image.permute(0, 3, 1, 2)
    out_results, out_data = [], []
    for img in image:
        image_pil = to_pil_image(img)
        inputs = processor(text=prompt, images=image_pil, return_tensors="pt", do_rescale=False).to(dtype).to(device)
        generated_ids = model.generate(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=num_beams,
        )
        results = processor.batch_decode(generated_ids, skip_special_tokens=False)[0]
        if task_prompt == "<OCR_WITH_REGION>":
            clean_results = re.sub(r"</?s>|<[^>]*>", "\\n", str(results))
            clean_results = re.sub(r"\\n+", "\\n", clean_results)
        else:
            clean_results = str(results).replace("</s>", "").replace("<s>", "")
        out_results.append(clean_results)
        W, H = image_pil.size
        parsed_answer = processor.post_process_generation(results, task=task_prompt, image_size=(W, H))
        if task_prompt in ("<OD>", "<DENSE_REGION_CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>", "<REGION_PROPOSAL>"):
            out_data.append(parsed_answer[task_prompt]["bboxes"])
        elif task_prompt == "<OCR_WITH_REGION>":
            predictions = parsed_answer[task_prompt]
            for box, label in zip(predictions["quad_boxes"], predictions["labels"]):
                out_data.append({"label": label, "box": [v / (W if idx % 2 == 0 else H) for idx, v in enumerate(box)]})
        RECORD.append((inputs["pixel_values"], generated_ids, results, parsed_answer))
    return out_results, out_data


OUTPUTS = [encode(IMAGE_TENSOR, task, text) for task, text in TASKS]
'''


def test_comfyui_florence2_run(both, layout):
    ours, theirs = both
    # ComfyUI's IMAGE: B×H×W×3 float32 in [0, 1].
    batch = np.stack([np.asarray(image.resize((160, 120)), dtype=np.float32) / 255 for image in _images()])
    tensor = torch.from_numpy(batch)
    tasks = [("<OD>", ""), ("<CAPTION>", ""), ("<OCR_WITH_REGION>", ""),
             ("<CAPTION_TO_PHRASE_GROUNDING>", "a woman"), ("<REFERRING_EXPRESSION_SEGMENTATION>", "a cup")]
    names = {"IMAGE_TENSOR": tensor, "TASKS": tasks}
    got = ours(COMFYUI, RECORD=[], **names)
    want = theirs(COMFYUI, RECORD=[], **names)
    # do_rescale=False: in transformers' processor the pixels stay in 0..255 before normalizing; Microsoft's
    # remote code does not hand do_rescale to its image processor, so they are rescaled.
    assert (float(want["RECORD"][0][0].mean()) > 50) == (layout == "hf")
    for (g_pixels, *g_rest), (w_pixels, *w_rest) in zip(got["RECORD"], want["RECORD"]):
        np.testing.assert_allclose(g_pixels.numpy(), w_pixels.numpy(), rtol=0, atol=1e-5)
        _assert_equal(g_rest, w_rest)
    _assert_equal(got["OUTPUTS"], want["OUTPUTS"])
