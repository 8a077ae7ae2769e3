"""The `florence2` command: Florence-2 tasks on images, one JSON line per image and task on stdout.

    florence2 [--model ID_OR_DIR] [--task TASK] [--text TEXT] [--dtype DTYPE] [--quantize int8|int4] [--threads N]
              [--batch-size N] [--draw DIR] [--output FILE.jsonl [--resume]] IMAGES_OR_FOLDERS_OR_GLOBS...

Exit status: 0 when every image was labeled, 1 when any image failed (its JSON line says why; the others are
still labeled), 2 for a usage error or a model that cannot be loaded.

With --output the lines also go to FILE as they are made, so that a run stopped part-way (Ctrl-C, a kill, a
reboot) keeps what it did; --resume continues such a run, labeling only the images FILE holds no result for.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator, Sequence, TextIO

from .draw import draw
from .labeling import (DEFAULT_MODEL, TASKS_WITHOUT_INPUT, Labeler, labeled_pairs, read_json_lines, task_token,
                       try_load_image)
from .._native import DTYPES
from ..quantization import QUANTIZE_MODES

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs on one --output file are the user's to avoid
    fcntl = None

#: File name endings taken from folders (a file named on the command line is tried whatever its ending).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_GLOB_CHARS = set("*?[")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads:
        # The Rust side computes on rayon's global pool, sized from this variable when it is first used:
        # it must be set before the first model call (importing the module does not start the pool).
        os.environ["RAYON_NUM_THREADS"] = str(usable_threads(args.threads, sys.stderr))
    tasks: list[str] = []
    for name in args.task or ["<OD>"]:
        try:
            tasks.extend(TASKS_WITHOUT_INPUT if name.lower() == "all" else [task_token(name)])
        except ValueError as err:
            parser.error(str(err))
    tasks = list(dict.fromkeys(tasks))  # `--task all --task OD` runs OD once
    files, missing = expand_inputs(args.inputs)
    if not files and not missing:
        parser.error("no images given")
    if args.resume and not args.output:
        parser.error("--resume continues the run recorded in --output FILE: name the file")
    out = Output(sys.stdout)
    if args.output:
        try:
            out.record_into(Path(args.output), resume=args.resume)
        except ValueError as err:
            parser.error(str(err))
        except OSError as err:
            parser.error(f"--output {args.output}: {err.strerror or err}")
    if out.done and not {_key(path) for path in files} & {file for file, _ in out.done}:
        print(f"florence2: warning: --resume: {args.output} holds results, but for none of these images: its paths "
              "are matched as absolute paths resolved from the current directory, so run from the directory the "
              "recorded run ran in, with the same paths; labeling every image", file=sys.stderr)
    # An image is done when FILE holds a result for each task; one with some tasks done is labeled again and
    # only its missing lines are written.
    files = [path for path in files if not all((_key(path), task) in out.done for task in tasks)]
    try:
        labeler = Labeler(args.model, tasks, args.text, dtype=args.dtype, quantize=args.quantize,
                          max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    except Exception as err:  # noqa: BLE001 - any failure to load is exit status 2 with its reason
        print(f"florence2: {err}", file=sys.stderr)
        return 2
    failed = False
    for pattern in missing:
        out.emit({"file": pattern, "error": "no such file, or no image matches it"})
        failed = True
    draw_dir = Path(args.draw) if args.draw else None
    if draw_dir is not None:
        try:
            draw_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"florence2: --draw {draw_dir}: {err}", file=sys.stderr)
            return 2
    progress = Progress(len(files), sys.stderr, enabled=not args.quiet and len(files) > 1 and sys.stderr.isatty())
    for batch in _chunks(files, args.batch_size):
        failed |= _label_batch(labeler, batch, out, draw_dir)
        progress.advance(len(batch))
    progress.close()
    out.close()
    return 1 if failed else 0


def usable_threads(requested: int, warnings: TextIO) -> int:
    """`requested`, or the number of CPUs this process may run on when it asks for more (with a warning).

    The model's work is split into one task per thread and each parallel step waits for its slowest task: with
    more threads than CPUs the operating system time-slices them, so extra threads only add switching and
    waiting, and each costs a stack, so the count a machine can start is bounded by its memory.
    The CPUs counted are those of the process's affinity mask (taskset, container cpusets), not the machine's.
    """
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested <= available:
        return requested
    print(f"florence2: --threads {requested} is more than the {available} CPUs this process can run on; using "
          f"{available} (more threads than CPUs only slow the model down)", file=warnings)
    return available


def positive_int(text: str) -> int:
    """The command lines' argparse type of counts (threads, batch size, tokens, beams, workers): an integer of
    at least 1, so that a setting that cannot work is a usage error before the model loads, not a failure of
    every image."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="florence2", description="Run Florence-2 tasks on images; prints one JSON line per image and task.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS_OR_GLOBS",
                        help="image files, folders (their images, not recursive) or glob patterns ('**' recurses)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id (downloaded once into the Hugging Face cache) or local checkpoint folder "
                             "(default: %(default)s)")
    parser.add_argument("--task", action="append", metavar="TASK",
                        help="a task such as OD, CAPTION, OCR_WITH_REGION (with or without <>); repeat for "
                             "several; 'all' runs every task that needs no input, encoding each image once "
                             "(default: OD)")
    parser.add_argument("--text", help="the input of tasks that take one (a phrase, or a region as "
                                       "<loc_x1><loc_y1><loc_x2><loc_y2>)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype; auto is the checkpoint's (default: %(default)s)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="quantize the linear layers' weights at load (as load_in_8bit / load_in_4bit)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads, at most the CPUs this process can run "
                                                              "on (default: all of them)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="images per model call (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=1024, help="default: %(default)s")
    parser.add_argument("--num-beams", type=positive_int, default=3, help="default: %(default)s")
    parser.add_argument("--draw", metavar="DIR", help="write one PNG per image with the results drawn on it")
    parser.add_argument("--output", metavar="FILE", help="also append the JSON lines to FILE as they are made "
                                                         "(refused if FILE is not empty, unless --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run recorded in --output FILE: skip the images it holds a result for "
                             "(images with an error line are labeled again)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files from files, folders and glob patterns, in command-line order, each file once.

    A file named on the command line is kept whatever it is (a FIFO, a device): reading it reports what it is
    (see `try_load_image`). Folders and globs give regular files only.

    Returns:
        (files, missing): the files, and the arguments that named nothing (reported as failures).
    """
    files: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found = [path]
        elif _GLOB_CHARS & set(item):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
        else:
            found = []
        if not found:
            missing.append(item)
        files.extend(found)
    return list(dict.fromkeys(files)), missing


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _label_batch(labeler: Any, batch: list[Path], out: "Output", draw_dir: Path | None) -> bool:
    """Labels one batch and prints its lines (those --output does not hold yet); returns True when any image
    of it failed."""
    readable, failed = [], False
    for path in batch:
        image, error = try_load_image(path)
        if error is None:
            readable.append((path, image))
        else:
            out.emit({"file": str(path), "error": error})
            failed = True
    if not readable:
        return failed
    results = labeler.label_or_errors([image for _, image in readable])
    for (path, image), result in zip(readable, results):
        if isinstance(result, str):
            out.emit({"file": str(path), "error": result})
            failed = True
            continue
        for record in result:
            if (_key(path), record["task"]) not in out.done:
                out.emit({"file": str(path), **record})
        if draw_dir is not None:
            try:
                picture = draw(image, {r["task"]: r["result"] for r in result})
                picture.save(_unused_name(draw_dir, path.stem))
            except Exception as err:  # noqa: BLE001 - the labels are printed; only the picture is missing
                out.emit({"file": str(path), "error": f"cannot draw the results: {type(err).__name__}: {err}"})
                failed = True
    return failed


def _key(file: str | os.PathLike) -> str:
    """The name under which --resume recognizes an image: its absolute path (`a.png` and `./a.png` are one)."""
    return os.path.abspath(file)


def _unused_name(folder: Path, stem: str) -> Path:
    """folder/stem.png, or stem-1.png ... when two inputs share a name."""
    candidate, n = folder / f"{stem}.png", 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}.png"
    return candidate


class Output:
    """Where the JSON lines go: stdout, and with `record_into` a file that keeps them across runs.

    Each line is written whole and flushed as it is made: stdout for pipes such as `| jq`, the file so that a
    run killed part-way loses only the image it was labeling. The file is opened for appending and held under
    an exclusive lock (where the platform has one), so two runs cannot interleave their lines in it.

    Attributes:
        done: (absolute path, task) pairs the file already holds a result for (empty without `--resume`).
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.file: IO[bytes] | None = None
        self.done: set[tuple[str, str]] = set()

    def record_into(self, path: Path, resume: bool) -> None:
        """Appends the lines to `path` too. Without `resume` the file must be empty or absent; with it, the
        results it holds are read into `done`, and a last line cut short by a kill is removed.

        Raises:
            ValueError: the file holds lines and `resume` is False, it holds a line that is not a record, it
                is not a regular file, or another run is writing it.
            OSError: it cannot be opened.
        """
        # Without blocking, and checked once open: reading a FIFO back would wait for ever.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o666)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"--output {path} is not a regular file: name a file (stdout gets the lines anyway)")
        file = os.fdopen(fd, "ab+")  # held open for the whole run, closed by close()
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ValueError(f"--output {path}: another florence2 run is writing this file") from None
            file.seek(0)
            content = file.read()
            if content and not resume:
                raise ValueError(f"--output {path} already holds results: pass --resume to continue that run "
                                 "(the images it holds a result for are skipped), or name another file")
            records, complete = read_json_lines(content, str(path))
            if complete < len(content):
                file.truncate(complete)  # the partial line of a killed run; its image is labeled again
            elif content and not content.endswith(b"\n"):
                file.write(b"\n")  # a whole record without its line end: keep it, start a new line
        except BaseException:
            file.close()
            raise
        self.file = file
        self.done = {(_key(file_name), task) for file_name, task in labeled_pairs(records, "file")}

    def emit(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self.file is not None:
            # One write of the whole line: a kill leaves whole lines and at most one partial last line.
            self.file.write(line.encode("utf-8"))
            self.file.flush()
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """A one-line progress bar on a terminal: done/total, rate and time left."""

    def __init__(self, total: int, stream: TextIO, enabled: bool = True, width: int = 30) -> None:
        self.total, self.stream, self.enabled, self.width = total, stream, enabled, width
        self.done = 0
        self.start = time.perf_counter()

    def advance(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        per_image = elapsed / self.done if self.done else 0.0
        filled = round(self.width * self.done / max(1, self.total))
        bar = "#" * filled + "-" * (self.width - filled)
        left = per_image * (self.total - self.done)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} images, {per_image:.1f} s/image, {left:.0f} s left ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
