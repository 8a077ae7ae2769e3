"""The two examples of transformers' Florence-2 page, run with only the import changed.

The page loads Hub checkpoints and a picture by URL; here there is no network, so the Hub id becomes the local
end-to-end checkpoint (both layouts), the URL a local file, `device=0` the CPU (this machine has no GPU, which
transformers would need too), and max_new_tokens is small. Each substitution must hit, so the example text stays
the page's. A second variant runs without torch: torch is blocked from import in a subprocess and the dtypes are
given by name, `return_tensors="np"`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import skimage
import torch_blocker
from PIL import Image

PIPELINE_EXAMPLE = '''
import torch
import requests
from PIL import Image
from transformers import pipeline

pipeline = pipeline(
    "image-text-to-text",
    model="ducviet00/Florence-2-base-hf",
    device=0,
    dtype=torch.bfloat16
)

pipeline(
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/tasks/car.jpg?download=true",
    text="<OD>"
)
'''

AUTOMODEL_EXAMPLE = '''
# pip install bitsandbytes
import torch
import requests
from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration, BitsAndBytesConfig

quantization_config = BitsAndBytesConfig(load_in_4bit=True)

model = Florence2ForConditionalGeneration.from_pretrained(
    "microsoft/Florence-2-large",
    dtype=torch.bfloat16,
    device_map="auto",
    quantization_config=quantization_config
)
processor = AutoProcessor.from_pretrained("microsoft/Florence-2-large")

url = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/tasks/car.jpg?download=true"
image = Image.open(requests.get(url, stream=True).raw).convert("RGB")

task_prompt = "<OD>"
inputs = processor(text=task_prompt, images=image, return_tensors="pt").to(model.device, torch.bfloat16)

generated_ids = model.generate(
    **inputs,
    max_new_tokens=1024,
    num_beams=3,
)
generated_text = processor.batch_decode(generated_ids, skip_special_tokens=False)[0]

image_size = image.size
parsed_answer = processor.post_process_generation(generated_text, task=task_prompt, image_size=image_size)

print(parsed_answer)
'''

URL = ("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/tasks/car.jpg"
       "?download=true")


def _substitute(source: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        assert old in source, f"the example no longer contains {old!r}"
        source = source.replace(old, new)
    return source


def _local(source: str, folder, image_path) -> str:
    """The example on local files: only the import, the sources and the lengths change."""
    return _substitute(source, [
        ("from transformers import", "from florence2_rs import"),
        ("import requests\n", ""),
        ('"ducviet00/Florence-2-base-hf"' if "ducviet00" in source else '"microsoft/Florence-2-large"',
         repr(str(folder))),
        (f'"{URL}"', repr(str(image_path))),
    ])


def _pipeline_example(folder, image_path, torch_free: bool) -> str:
    source = _substitute(_local(PIPELINE_EXAMPLE, folder, image_path), [
        ("device=0", 'device="cpu"'),
        ('text="<OD>"\n)', 'text="<OD>", max_new_tokens=8\n)'),
        ("\npipeline(\n    '", "\nresult = pipeline(\n    '"),
    ])
    if torch_free:
        source = _substitute(source, [("import torch\n", ""), ("dtype=torch.bfloat16", 'dtype="bfloat16"')])
    return source


def _automodel_example(folder, image_path, torch_free: bool) -> str:
    source = _substitute(_local(AUTOMODEL_EXAMPLE, folder, image_path), [
        ("Image.open(requests.get(url, stream=True).raw)", "Image.open(url)"),
        ("max_new_tokens=1024", "max_new_tokens=12"),
    ])
    if torch_free:
        source = _substitute(source, [
            ("import torch\n", ""),
            ("dtype=torch.bfloat16", 'dtype="bfloat16"'),
            ('return_tensors="pt").to(model.device, torch.bfloat16)', 'return_tensors="np").to(model.device, model.dtype)'),
        ])
    return source


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "car.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    return path


def _check_pipeline_result(result) -> None:
    assert isinstance(result, list) and len(result) == 1
    assert set(result[0]) == {"input_text", "generated_text"}
    assert result[0]["input_text"] == "<OD>" and result[0]["generated_text"].startswith("<OD>")


def _check_parsed_answer(answer) -> None:
    assert set(answer) == {"<OD>"}
    assert set(answer["<OD>"]) == {"bboxes", "labels"}
    assert len(answer["<OD>"]["bboxes"]) == len(answer["<OD>"]["labels"])


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_pipeline_example_with_torch(end_to_end_checkpoint, image_path, layout):
    scope: dict = {}
    exec(_pipeline_example(end_to_end_checkpoint / layout, image_path, torch_free=False), scope)
    _check_pipeline_result(scope["result"])


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_automodel_bitsandbytes_example_with_torch(end_to_end_checkpoint, image_path, layout, capsys):
    import torch

    scope: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="quantization_config")
        exec(_automodel_example(end_to_end_checkpoint / layout, image_path, torch_free=False), scope)
    assert scope["model"].dtype == torch.bfloat16
    assert scope["inputs"]["pixel_values"].dtype == torch.bfloat16
    assert isinstance(scope["generated_ids"], torch.Tensor)
    _check_parsed_answer(scope["parsed_answer"])
    assert "<OD>" in capsys.readouterr().out


# Runs an example with `import torch` failing, then reports what it made as JSON.
_TORCH_FREE_RUNNER = torch_blocker.PRELUDE + '''
import json, sys, warnings

warnings.simplefilter("ignore")
scope = {}
exec(sys.stdin.read(), scope)
assert "torch" not in sys.modules
report = {"result": scope.get("result"), "parsed_answer": scope.get("parsed_answer")}
if "model" in scope:
    report["dtype"] = scope["model"].dtype
    report["ids_type"] = type(scope["generated_ids"]).__module__
print("REPORT" + json.dumps(report))
'''


def _run_without_torch(source: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _TORCH_FREE_RUNNER], input=source, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_examples_without_torch(end_to_end_checkpoint, image_path, layout):
    folder = end_to_end_checkpoint / layout
    _check_pipeline_result(_run_without_torch(_pipeline_example(folder, image_path, torch_free=True))["result"])
    report = _run_without_torch(_automodel_example(folder, image_path, torch_free=True))
    assert report["dtype"] == "bfloat16" and report["ids_type"] == "numpy"
    _check_parsed_answer(report["parsed_answer"])
