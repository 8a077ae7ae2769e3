"""The florence2 command, run as a subprocess on the tiny end-to-end checkpoint."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from florence2_rs.apps.cli import Progress, expand_inputs
from florence2_rs import AutoProcessor
from florence2_rs.apps.labeling import TASKS_WITH_INPUT, TASKS_WITHOUT_INPUT, Labeler

ROOT = Path(__file__).resolve().parents[2]
# Short generations: random weights would otherwise run to the 1024-token default.
FAST = ["--max-new-tokens", "6", "--num-beams", "1", "--threads", "2"]


# Address space of a command run by `run_bounded`: the tiny model needs far less; a run that reads without end
# stops at the limit instead of filling the machine's memory.
ADDRESS_SPACE = 16 * 1024**3


def run(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder must need no network
    return subprocess.run([sys.executable, "-m", "florence2_rs", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def _bounded_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(*args: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    """`run` in the style of test_adversarial.py: a hang fails the test at `timeout`, the address space is
    bounded, and a death by a signal is a failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "florence2_rs", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=env, preexec_fn=_bounded_address_space)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the command hung (no end within {timeout} s)")
    assert done.returncode >= 0, f"the command died (signal {-done.returncode}):\n{done.stderr[-3000:]}"
    return done


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
    assert scripts["florence2"] == "florence2_rs.apps.cli:main"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_socket_named_on_the_command_line_is_a_failure_of_its_own(end_to_end_checkpoint, tmp_path):
    """Only regular files are read: a FIFO with no writer (which would block the read for ever) and a socket
    each get their error line, and the image after them is labeled."""
    os.mkfifo(tmp_path / "a_fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "b_socket.png"))
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "c_coffee.png")
    try:
        result = run_bounded("--model", end_to_end_checkpoint / "hf", *FAST, tmp_path / "a_fifo.png",
                             tmp_path / "b_socket.png", tmp_path / "c_coffee.png", timeout=90)
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    records = {Path(r["file"]).name: r for r in lines(result)}
    assert "FIFO" in records["a_fifo.png"]["error"] and "socket" in records["b_socket.png"]["error"]
    assert records["c_coffee.png"]["task"] == "<OD>" and "error" not in records["c_coffee.png"]


def test_more_threads_than_cpus_are_cut_to_the_cpus_with_a_warning(end_to_end_checkpoint, images):
    result = run_bounded("--model", end_to_end_checkpoint / "hf", "--max-new-tokens", "6", "--num-beams", "1",
                         "--threads", "100000", images / "coffee.png", timeout=90)
    assert result.returncode == 0, result.stderr
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert f"--threads 100000 is more than the {cpus} CPUs" in result.stderr
    assert lines(result)[0]["task"] == "<OD>"


@pytest.mark.parametrize("setting", [["--max-new-tokens", "0"], ["--num-beams", "0"], ["--batch-size", "0"],
                                     ["--threads", "0"], ["--max-new-tokens", "-3"], ["--num-beams", "-1"]],
                         ids=lambda s: " ".join(s))
def test_settings_that_cannot_work_are_usage_errors_before_the_model_loads(images, setting):
    # A model folder that does not exist: had the command gone on to load it, the error would name the folder.
    result = run_bounded("--model", images / "no-such-checkpoint", *setting, images / "coffee.png")
    assert result.returncode == 2 and result.stdout == ""
    assert "usage:" in result.stderr and f"argument {setting[0]}: must be a positive integer" in result.stderr


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_refuses_a_file_with_results_and_resume_needs_output(end_to_end_checkpoint, images, tmp_path):
    output = tmp_path / "labels.jsonl"
    output.write_text('{"file": "x.png", "task": "<OD>", "result": {}, "timings": {}}\n')
    refused = run_bounded("--model", end_to_end_checkpoint / "hf", *FAST, "--output", output, images)
    assert refused.returncode == 2 and "--resume" in refused.stderr and refused.stdout == ""
    assert _records(output) == [{"file": "x.png", "task": "<OD>", "result": {}, "timings": {}}]
    alone = run_bounded("--model", end_to_end_checkpoint / "hf", *FAST, "--resume", images)
    assert alone.returncode == 2 and "--output" in alone.stderr


def test_resume_warns_when_the_file_matches_none_of_the_images(end_to_end_checkpoint, images, tmp_path):
    """FILE's paths are absolute, resolved from the directory of the run that wrote them: a resumed run from
    another directory, with relative paths, matches none of them; it says why on stderr and labels every image."""
    output = tmp_path / "labels.jsonl"
    output.write_text(json.dumps({"file": str(tmp_path / "elsewhere" / "coffee.png"), "task": "<OD>", "result": {},
                                  "timings": {}}) + "\n")
    resumed = run_bounded("--model", end_to_end_checkpoint / "hf", *FAST, "--output", output, "--resume",
                          images / "coffee.png")
    assert resumed.returncode == 0, resumed.stderr
    assert "holds results, but for none of these images" in resumed.stderr
    assert "absolute paths resolved from the current directory" in resumed.stderr
    assert [r["task"] for r in lines(resumed)] == ["<OD>"]
    matched = run_bounded("--model", end_to_end_checkpoint / "hf", *FAST, "--output", output, "--resume",
                          images / "coffee.png")
    assert matched.returncode == 0 and "warning" not in matched.stderr and lines(matched) == []


def test_a_killed_run_resumes_without_losing_or_redoing_an_image(end_to_end_checkpoint, tmp_path):
    """`--output FILE`, killed (SIGKILL) part-way and cut in the middle of a line, then run again with
    `--resume`: every image ends with one result line per task in FILE, and the resumed run labels only what
    FILE lacked (the images not reached, the one whose line was cut short, and the one that had failed)."""
    folder = tmp_path / "images"
    folder.mkdir()
    photo = skimage.data.coffee()
    for i in range(24):
        Image.fromarray(photo[i: 200 + i, :300]).save(folder / f"{i:02d}.png")
    (folder / "zz_broken.png").write_bytes(b"not an image")
    output = tmp_path / "labels.jsonl"
    command = [sys.executable, "-m", "florence2_rs", "--model", str(end_to_end_checkpoint / "hf"), *FAST,
               "--task", "OD", "--task", "CAPTION", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([*command, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while (not output.exists() or output.read_text().count("\n") < 6) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    first.stderr.close()
    content = output.read_text()
    whole, cut = content[: content.rfind("\n") + 1], content[content.rfind("\n") + 1:]
    kept = [json.loads(line) for line in whole.splitlines()]
    assert 6 <= len(kept) < 48, "the kill should come part-way through the run"
    # The first image as a failure of the earlier run (labeled again on resume), and what a kill in the middle
    # of a write leaves: a partial last line (unless this kill left one already).
    failed = kept[0]["file"]
    kept = [r for r in kept if r["file"] != failed] + [{"file": failed, "error": "an earlier failure"}]
    partial = cut or '{"file": "' + str(folder / "23.png") + '", "task": "<OD>", "r'
    output.write_text("".join(json.dumps(r) + "\n" for r in kept) + partial)
    labeled_before = {(Path(r["file"]).name, r["task"]) for r in kept if "error" not in r}
    resumed = run_bounded(*command[3:], "--resume", folder, timeout=300)
    assert resumed.returncode == 1, resumed.stderr  # zz_broken.png
    new = [(Path(r["file"]).name, r.get("task")) for r in lines(resumed)]
    assert len(new) == len(set(new)), "a line printed twice"
    expected = {(f"{i:02d}.png", task) for i in range(24) for task in ("<OD>", "<CAPTION>")}
    assert set(new) == expected - labeled_before | {("zz_broken.png", None)}
    final = _records(output)  # every line parses: the partial one is gone
    results = [(Path(r["file"]).name, r["task"]) for r in final if "error" not in r]
    assert sorted(results) == sorted(expected), "an image lost or labeled twice"


def test_quantize_answers_as_the_python_api_quantized(end_to_end_checkpoint, images):
    """`--quantize int8` loads the model `quantization_config=BitsAndBytesConfig(load_in_8bit=True)` loads: the
    same answer as the library's quantized model, and the Labeler's model is the quantized one."""
    from florence2_rs import BitsAndBytesConfig, Florence2ForConditionalGeneration

    folder = end_to_end_checkpoint / "hf"
    result = run("--model", folder, "--task", "OD", "--quantize", "int8", *FAST, images / "astronaut.jpg")
    assert result.returncode == 0, result.stderr
    got = lines(result)[0]["result"]
    processor = AutoProcessor.from_pretrained(folder)
    model = Florence2ForConditionalGeneration.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    image = Image.open(images / "astronaut.jpg")
    inputs = processor(text="<OD>", images=image, return_tensors="np")
    ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=6,
                         num_beams=1)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    want = processor.post_process_generation(text, task="<OD>", image_size=image.size)["<OD>"]
    assert {key: got[key] for key in want} == want
    assert Labeler(folder, ["<OD>"], quantize="int8").model._state.quantize == "int8"
    refused = run("--model", folder, "--quantize", "int3", images / "astronaut.jpg")
    assert refused.returncode == 2 and "--quantize" in refused.stderr
