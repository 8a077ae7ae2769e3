"""The florence2 command, run as a subprocess on the tiny end-to-end checkpoint."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from florence2_rs.cli import Progress, expand_inputs
from florence2_rs import AutoProcessor
from florence2_rs.labeling import TASKS_WITH_INPUT, TASKS_WITHOUT_INPUT, Labeler

ROOT = Path(__file__).resolve().parents[2]
# Short generations: random weights would otherwise run to the 1024-token default.
FAST = ["--max-new-tokens", "6", "--num-beams", "1", "--threads", "2"]


def run(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder must need no network
    return subprocess.run([sys.executable, "-m", "florence2_rs", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two photographs and a file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpg")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def boxes_checkpoint(end_to_end_checkpoint, tmp_path_factory) -> Path:
    """The HF-layout checkpoint whose generation may emit only location tokens (and BOS/EOS), each at most
    once, so that <REGION_PROPOSAL> answers with boxes of some size even with random weights."""
    folder = tmp_path_factory.mktemp("boxes") / "hf"
    shutil.copytree(end_to_end_checkpoint / "hf", folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    allowed = {vocab[f"<loc_{b}>"] for b in range(1000)} | {vocab["<s>"], vocab["</s>"]}
    size = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    settings = json.loads((folder / "generation_config.json").read_text())
    settings["suppress_tokens"] = [i for i in range(size) if i not in allowed]
    settings["no_repeat_ngram_size"] = 1
    (folder / "generation_config.json").write_text(json.dumps(settings))
    return folder


def test_a_line_per_image_and_task_and_a_failure_does_not_stop_the_run(end_to_end_checkpoint, images):
    result = run("--model", end_to_end_checkpoint / "hf", "--task", "all", "--batch-size", "2", *FAST, images)
    assert result.returncode == 1, result.stderr  # broken.jpg failed
    records = lines(result)
    errors = [r for r in records if "error" in r]
    assert [Path(r["file"]).name for r in errors] == ["broken.jpg"]
    labeled = [r for r in records if "error" not in r]
    for name in ("astronaut.jpg", "coffee.png"):
        assert [r["task"] for r in labeled if Path(r["file"]).name == name] == list(TASKS_WITHOUT_INPUT)
    for record in labeled:
        assert set(record) == {"file", "task", "result", "timings"}
        assert isinstance(record["result"], str if record["task"] in ("<OCR>", "<CAPTION>", "<DETAILED_CAPTION>",
                                                                     "<MORE_DETAILED_CAPTION>") else dict)
        assert record["timings"]["image"] > 0 and record["timings"]["generate"] > 0


def test_files_pillow_refuses_are_failures_of_their_own(end_to_end_checkpoint, tmp_path):
    """A file that declares more pixels than Pillow allows (DecompressionBombError) and one with a corrupt EXIF
    chunk (SyntaxError from exif_transpose) each get their error line; the images after them are labeled."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a_bomb.png")
    bomb = bytearray((tmp_path / "a_bomb.png").read_bytes())
    bomb[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width and height; Pillow checks the size at open
    bomb[29:33] = zlib.crc32(bomb[12:29]).to_bytes(4, "big")  # the IHDR chunk's checksum
    (tmp_path / "a_bomb.png").write_bytes(bytes(bomb))
    Image.new("RGB", (8, 8)).save(tmp_path / "b_exif.png", exif=b"not a TIFF header")
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "c_coffee.png")
    result = run("--model", end_to_end_checkpoint / "hf", "--task", "CAPTION", "--batch-size", "2", *FAST, tmp_path)
    assert result.returncode == 1, result.stderr
    records = {Path(r["file"]).name: r for r in lines(result)}
    assert "DecompressionBombError" in records["a_bomb.png"]["error"]
    assert "SyntaxError" in records["b_exif.png"]["error"]
    assert records["c_coffee.png"]["task"] == "<CAPTION>" and "error" not in records["c_coffee.png"]


def test_a_batch_that_fails_is_labeled_again_image_by_image():
    class Picky(Labeler):
        def __init__(self):  # no model: label() below stands for it
            pass

        def label(self, images):
            if "bad" in images:
                raise ValueError("the model cannot take this one")
            return [[{"task": "<OD>", "image": image}] for image in images]

    assert Picky().label_or_errors(["a", "bad", "b"]) == [
        [{"task": "<OD>", "image": "a"}], "ValueError: the model cannot take this one", [{"task": "<OD>", "image": "b"}]]


def test_success_exits_zero_with_globs_and_the_original_layout(end_to_end_checkpoint, images):
    result = run("--model", end_to_end_checkpoint / "original", "--task", "caption", *FAST,
                 images / "*.png", images / "astronaut.jpg")
    assert result.returncode == 0, result.stderr
    assert [(Path(r["file"]).name, r["task"]) for r in lines(result)] == \
        [("coffee.png", "<CAPTION>"), ("astronaut.jpg", "<CAPTION>")]


def test_tasks_with_input_take_text(end_to_end_checkpoint, images):
    result = run("--model", end_to_end_checkpoint / "hf", "--task", "<CAPTION_TO_PHRASE_GROUNDING>",
                 "--text", "a person", *FAST, images / "astronaut.jpg")
    assert result.returncode == 0, result.stderr
    assert set(lines(result)[0]["result"]) == {"bboxes", "labels"}


def test_draw_writes_a_png_with_the_boxes_drawn(boxes_checkpoint, images, tmp_path):
    result = run("--model", boxes_checkpoint, "--task", "REGION_PROPOSAL", "--draw", tmp_path,
                 "--max-new-tokens", "10", "--num-beams", "1", images / "astronaut.jpg")
    assert result.returncode == 0, result.stderr
    answer = lines(result)[0]["result"]
    assert answer["bboxes"], "the suppressed vocabulary should leave only boxes to generate"
    assert len(answer["scores"]) == len(answer["bboxes"])
    assert all(0.0 < s <= 1.0 for s in answer["scores"])
    original = np.asarray(Image.open(images / "astronaut.jpg").convert("RGB"), np.int16)
    drawn = np.asarray(Image.open(tmp_path / "astronaut.png").convert("RGB"), np.int16)
    height, width = original.shape[:2]
    assert drawn.shape[1] == width and drawn.shape[0] > height
    difference = np.abs(drawn[:height] - original).sum(axis=-1) > 30
    for x1, y1, x2, y2 in answer["bboxes"]:
        left, top, bottom = min(x1, x2), min(y1, y2), max(y1, y2)
        assert difference[(top + bottom) // 2, left]  # the middle of the box's left edge
    assert difference.mean() < 0.5  # outlines, not a repainted picture


def test_usage_errors_exit_two(end_to_end_checkpoint, images):
    model = end_to_end_checkpoint / "hf"
    unknown = run("--model", model, "--task", "NOT_A_TASK", images)
    assert unknown.returncode == 2 and "unknown task" in unknown.stderr
    needs_text = run("--model", model, "--task", "CAPTION_TO_PHRASE_GROUNDING", images)
    assert needs_text.returncode == 2 and "needs an input" in needs_text.stderr
    missing_model = run("--model", images / "no-such-checkpoint", images)
    assert missing_model.returncode == 2 and missing_model.stdout == ""


def test_names_that_match_nothing_are_failures(end_to_end_checkpoint, images):
    result = run("--model", end_to_end_checkpoint / "hf", *FAST, images / "nothing-*.jpg")
    assert result.returncode == 1
    assert lines(result) == [{"file": str(images / "nothing-*.jpg"), "error": "no such file, or no image matches it"}]


def test_the_task_lists_agree_with_the_processor(end_to_end_checkpoint):
    processor = AutoProcessor.from_pretrained(end_to_end_checkpoint / "hf")
    for task in TASKS_WITHOUT_INPUT:
        with pytest.raises(Exception, match="only content"):
            processor(text=f"{task} extra words")
    for task in TASKS_WITH_INPUT:
        prompt = processor.batch_decode(processor(text=f"{task} a phrase")["input_ids"])[0]
        assert task not in prompt and "a phrase" in prompt  # a template that takes the input


def test_inputs_expand_folders_globs_once_each(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.png"):
        (tmp_path / name).write_bytes(b"")
    files, missing = expand_inputs([str(tmp_path), str(tmp_path / "**" / "*.png"), str(tmp_path / "x.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.JPG", "b.png", "sub/c.png"]
    assert missing == [str(tmp_path / "x.png")]


def test_progress_bar_counts_images():
    stream = io.StringIO()
    progress = Progress(4, stream)
    progress.advance(1)
    progress.advance(3)
    progress.close()
    assert "1/4 images" in stream.getvalue() and "4/4 images" in stream.getvalue()
    assert stream.getvalue().endswith("\n")


def test_the_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["florence2"] == "florence2_rs.cli:main"
