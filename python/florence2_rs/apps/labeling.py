"""Labeling many images with one or several Florence-2 tasks: the loop behind the `florence2` command and
the Ray Data example.

Each batch of images goes through the vision tower once; every task then generates from the same image
features (`get_image_features(...).pooler_output`, passed to `generate(image_features=...)`).
"""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any, Iterable, Sequence

import numpy as np

from .. import _native
from ..modeling import Florence2ForConditionalGeneration
from ..processing import AutoProcessor, load_image
from ..quantization import config_for_mode

DEFAULT_MODEL = "microsoft/Florence-2-base"

#: Tasks whose prompt is the task token alone, in the processor's table order (src/processor/prompts.rs);
#: `--task all` runs these. TASKS_WITH_INPUT: tasks that read an input after the token (a phrase, or a region
#: given as four <loc_*> tokens).
TASKS_WITHOUT_INPUT: tuple[str, ...] = _native.TASKS_WITHOUT_INPUT
TASKS_WITH_INPUT: tuple[str, ...] = _native.TASKS_WITH_INPUT

# Answer keys that hold boxes; "scores" goes beside them.
_BOX_KEYS = ("bboxes", "quad_boxes")


def task_token(name: str) -> str:
    """`"<OD>"`, `"od"` or `"OD"` → `"<OD>"`; raises ValueError for a name that is no Florence-2 task."""
    token = name.strip()
    if not token.startswith("<"):
        token = f"<{token.upper()}>"
    if token not in TASKS_WITHOUT_INPUT + TASKS_WITH_INPUT:
        choices = ", ".join(t.strip("<>") for t in TASKS_WITHOUT_INPUT + TASKS_WITH_INPUT)
        raise ValueError(f"unknown task {name!r}; choose one of: {choices}, or all")
    return token


def try_load_image(source: Any) -> tuple[Any, str | None]:
    """`load_image`, with a failure as text: (image, None), or (None, why the file cannot be read).

    A path is read only if it is a regular file: a FIFO would block the read until some other process writes
    to it (forever, if none does), and a device or socket is no image. The check is on the opened file
    (opened without blocking, then `fstat`), so that a path swapped for a FIFO after a check cannot block.

    Pillow raises more than OSError on bad files: DecompressionBombError (an Exception) for a file that
    declares more pixels than `PIL.Image.MAX_IMAGE_PIXELS` allows, SyntaxError or ValueError for a corrupt
    EXIF chunk; each is that file's failure, not the run's.
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            with _open_regular_file(source) as file:
                return load_image(file), None
        return load_image(source), None
    except Exception as err:  # noqa: BLE001 - any decoder failure belongs to its file
        return None, f"cannot read the image: {type(err).__name__}: {err}"


# What `stat` calls the kinds of file that are not regular files.
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_regular_file(path: str | os.PathLike):
    """`path` opened for binary reading; OSError when it is not a regular file.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; it changes nothing for a
    regular file, whose reads never block."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise OSError(f"{os.fspath(path)} is {kind}, not an image file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json_lines(content: bytes, name: str) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file written line by line, which a kill may have cut short.

    Args:
        content: the file's bytes.
        name: the file's name, for the error message.

    Returns:
        (records, complete): the records, and how many leading bytes of `content` hold them. A last line
        without its line end that does not parse (a write cut short) is left out of both; one that parses is
        kept.

    Raises:
        ValueError: a line other than the last is not a JSON object (the file is not such a record).
    """
    lines = content.split(b"\n")
    records, complete = [], 0
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if last:
                    break
                raise ValueError(f"{name} line {number} is not a JSON record: {line[:80]!r} (is it the file of "
                                 "another program?)")
            records.append(record)
        complete += len(line) + (0 if last else 1)
    return records, complete


def labeled_pairs(records: Iterable[dict[str, Any]], file_key: str) -> set[tuple[str, str]]:
    """(file, task) of the records that hold a result (records of failures hold an "error" instead).

    Args:
        records: label records: the `florence2` command's lines (`file_key` "file") or the Ray labeler's rows
            (`file_key` "path", with "error" None when there is a result).
        file_key: the key of the image's name.
    """
    return {(str(r[file_key]), str(r["task"])) for r in records
            if r.get(file_key) is not None and r.get("task") is not None and r.get("error") is None
            and "result" in r}


class Labeler:
    """A model and processor loaded once, labeling batches of images with a fixed list of tasks.

    Args:
        model: a checkpoint folder or Hub id (processor files and weights).
        tasks: task tokens (see `task_token`).
        text: the input of tasks that need one (a phrase, or `<loc_x1><loc_y1><loc_x2><loc_y2>`).
        dtype: "auto" (the checkpoint's), "float32", "float16" or "bfloat16".
        quantize: None, "int8" or "int4": the linear layers' weights quantized at load, as
            `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True))` (or 4 bits) does.
        **generate_kwargs: generation settings (max_new_tokens, num_beams, ...); the defaults are those of
            Microsoft's Florence-2 examples.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, tasks: Sequence[str] = ("<OD>",),
                 text: str | None = None, dtype: str = "auto", quantize: str | None = None,
                 **generate_kwargs: Any) -> None:
        self.tasks = [task_token(t) for t in tasks]
        for task in self.tasks:
            if task in TASKS_WITH_INPUT and not text:
                raise ValueError(f"{task} needs an input: pass text (a phrase or a region)")
            if task in TASKS_WITHOUT_INPUT and text:
                raise ValueError(f"{task} takes no input, but text was given")
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = Florence2ForConditionalGeneration.from_pretrained(
            model, dtype=dtype, quantization_config=config_for_mode(quantize))
        self.generate_kwargs = {"max_new_tokens": 1024, "num_beams": 3, "do_sample": False, **generate_kwargs}
        # The prompt ids of a task are the same for every image: build them once. The processor's public
        # __call__ would also resize the images again for each task; encode_prompts builds only the ids
        # (with the image placeholders of the checkpoint's layout).
        self._prompt_ids = {
            task: self.processor._core.encode_prompts([task + (text or "")], True)[0][0] for task in self.tasks
        }

    def label(self, images: Sequence[Any]) -> list[list[dict[str, Any]]]:
        """Runs every task on every image.

        Args:
            images: RGB PIL images (or H×W×3 uint8 arrays).

        Returns:
            Per image, one record per task: {"task", "result" (post_process_generation's answer, with
            "scores" beside boxes, see `add_box_scores`), "timings" (seconds per image: "image" for
            preprocessing and the vision tower, shared by the tasks, and "generate")}.
        """
        count = len(images)
        start = time.perf_counter()
        pixel_values = self.processor.image_processor(images, return_tensors="np")["pixel_values"]
        features = self.model.get_image_features(pixel_values).pooler_output
        image_s = (time.perf_counter() - start) / count
        records: list[list[dict[str, Any]]] = [[] for _ in images]
        for task in self.tasks:
            start = time.perf_counter()
            sequences, token_scores = self._generate(task, features, count)
            generate_s = (time.perf_counter() - start) / count
            for i, image in enumerate(images):
                answer = scored_answer(self.processor, task, sequences[i], token_scores[i], _image_size(image))
                records[i].append({"task": task, "result": answer,
                                   "timings": {"image": round(image_s, 4), "generate": round(generate_s, 4)}})
        return records

    def label_or_errors(self, images: Sequence[Any]) -> list[list[dict[str, Any]] | str]:
        """`label`, with each image's failure as its error text in place of its records: a batch that fails
        is labeled again one image at a time, so that one image the model cannot take fails alone."""
        try:
            return self.label(images)
        except Exception as err:  # noqa: BLE001 - a long run labels the other images; the text says why
            if len(images) == 1:
                return [f"{type(err).__name__}: {err}"]
        return [self.label_or_errors([image])[0] for image in images]

    def _generate(self, task: str, features: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Generated ids and the log-probability of each generated token, for `count` images' features."""
        ids = np.tile(np.asarray(self._prompt_ids[task], dtype=np.int64), (count, 1))
        result = self.model.generate(input_ids=ids, attention_mask=np.ones_like(ids),
                                     image_features=np.asarray(features, np.float32),
                                     **{**self.generate_kwargs, "return_dict_in_generate": True})
        return result.sequences, result.token_scores


def _image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or an H×W(×C) array."""
    if hasattr(image, "size") and isinstance(image.size, tuple):
        return image.size
    shape = np.shape(image)
    return shape[1], shape[0]


def scored_answer(processor: Any, task: str, sequence: Sequence[int], token_scores: Sequence[float],
                  image_size: tuple[float, float]) -> Any:
    """One task's answer for generated ids, with a score beside each box.

    Args:
        processor: the checkpoint's `Florence2Processor`.
        task: the task token.
        sequence: the generated ids (starting with the decoder start token, as `generate` returns them).
        token_scores: the log-probability of each generated token (`sequence[1:]`).
        image_size: (width, height) of the image.

    Returns:
        `post_process_generation(batch_decode([sequence], skip_special_tokens=False)[0], task=task,
        image_size=image_size)[task]`, with "scores" beside its boxes (see `add_box_scores`).
    """
    answers, box_tokens = processor._core.post_process_sequence(
        task, np.asarray(sequence).tolist(), tuple(float(v) for v in image_size))
    answer = answers[task]
    if isinstance(answer, dict):
        add_box_scores(answer, box_tokens, token_scores)
    return answer


def add_box_scores(answer: dict[str, Any], box_tokens: Sequence[Sequence[int] | None],
                   token_scores: Sequence[float]) -> None:
    """Adds a confidence in [0, 1] beside the boxes of an answer: "scores" beside "bboxes" and "quad_boxes".

    A box's confidence is the geometric mean of the probabilities the decoder gave the location tokens its
    coordinates were read from, which the post-processor reports (`box_tokens`). It ranks a model's boxes;
    it is not a calibrated detection score. A box no location token wrote (text spelling out `<loc_N>`) gets
    None.

    Args:
        answer: one task's answer from the processor's `post_process_sequence` (changed in place).
        box_tokens: for each box of the answer, in order, the indices of its location tokens in the generated
            ids, or None.
        token_scores: the log-probability of each generated token (the ids after the decoder start token).
    """
    for key in _BOX_KEYS:
        if not answer.get(key):
            continue
        scores = []
        for tokens in box_tokens:
            # The decoder start token (index 0) was not generated and has no log-probability.
            if not tokens or min(tokens) < 1:
                scores.append(None)
                continue
            log_probs = np.asarray([token_scores[t - 1] for t in tokens], np.float64)
            scores.append(round(float(np.exp(log_probs.mean())), 4))
        answer["scores"] = scores
