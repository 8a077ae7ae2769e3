"""The `florence2` command: Florence-2 tasks on images, one JSON line per image and task on stdout.

    florence2 [--model ID_OR_DIR] [--task TASK] [--text TEXT] [--dtype DTYPE] [--threads N]
              [--batch-size N] [--draw DIR] IMAGES_OR_FOLDERS_OR_GLOBS...

Exit status: 0 when every image was labeled, 1 when any image failed (its JSON line says why; the others are
still labeled), 2 for a usage error or a model that cannot be loaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from .draw import draw
from .labeling import DEFAULT_MODEL, TASKS_WITHOUT_INPUT, Labeler, task_token, try_load_image

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
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
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
    try:
        labeler = Labeler(args.model, tasks, args.text, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams)
    except Exception as err:  # noqa: BLE001 - any failure to load is exit status 2 with its reason
        print(f"florence2: {err}", file=sys.stderr)
        return 2
    out = sys.stdout
    failed = False
    for pattern in missing:
        _emit(out, {"file": pattern, "error": "no such file, or no image matches it"})
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
    return 1 if failed else 0


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
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="compute dtype; auto is the checkpoint's (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per model call (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="default: %(default)s")
    parser.add_argument("--num-beams", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--draw", metavar="DIR", help="write one PNG per image with the results drawn on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files from files, folders and glob patterns, in command-line order, each file once.

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
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _label_batch(labeler: Any, batch: list[Path], out: TextIO, draw_dir: Path | None) -> bool:
    """Labels one batch and prints its lines; returns True when any image of it failed."""
    readable, failed = [], False
    for path in batch:
        image, error = try_load_image(path)
        if error is None:
            readable.append((path, image))
        else:
            _emit(out, {"file": str(path), "error": error})
            failed = True
    if not readable:
        return failed
    results = labeler.label_or_errors([image for _, image in readable])
    for (path, image), result in zip(readable, results):
        if isinstance(result, str):
            _emit(out, {"file": str(path), "error": result})
            failed = True
            continue
        for record in result:
            _emit(out, {"file": str(path), **record})
        if draw_dir is not None:
            try:
                picture = draw(image, {r["task"]: r["result"] for r in result})
                picture.save(_unused_name(draw_dir, path.stem))
            except Exception as err:  # noqa: BLE001 - the labels are printed; only the picture is missing
                _emit(out, {"file": str(path), "error": f"cannot draw the results: {type(err).__name__}: {err}"})
                failed = True
    return failed


def _unused_name(folder: Path, stem: str) -> Path:
    """folder/stem.png, or stem-1.png ... when two inputs share a name."""
    candidate, n = folder / f"{stem}.png", 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}.png"
    return candidate


def _emit(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()  # a line per image as it is done, for pipes such as `| jq` or `| tee`


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
