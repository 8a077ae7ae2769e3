"""Labeling a folder of images at scale with Ray Data: each Ray worker loads the model once and labels
batches of images; the same code runs in Ray's local mode on one machine and on a Ray cluster.

    python -m florence2_rs.apps.ray_labeling IMAGES_DIR OUTPUT_DIR [--model ID_OR_DIR] [--task TASK ...]
        [--workers N] [--threads-per-worker N] [--batch-size N] [--address ADDRESS] [--resume]

Writes JSON lines (one row per image and task: path, task, result as a JSON string, error) into OUTPUT_DIR.
Files are read as bytes and decoded on the workers, so an unreadable file (or one the model cannot take)
becomes a row with an error instead of failing the job. `--resume` continues a job that stopped part-way: the
images OUTPUT_DIR already holds a result for (every task) are skipped, and the new rows go into new files
beside the old ones. Needs `pip install "ray[data]"`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Collection, Sequence

import numpy as np

from .cli import positive_int
from .labeling import DEFAULT_MODEL, Labeler, labeled_pairs, read_json_lines, task_token, try_load_image

#: The columns of the labeled dataset.
COLUMNS = ("path", "task", "result", "error")


class RayLabeler:
    """The callable class given to `Dataset.map_batches`: Ray builds one per worker (actor), which loads the
    model once, then calls it on batches of {"path", "bytes"} rows.

    Args:
        threads: CPU threads of this worker's model; match the `num_cpus` Ray reserves for the worker.
        **labeler_kwargs: `florence2_rs.apps.labeling.Labeler` arguments (model, tasks, text, dtype, generation).
    """

    def __init__(self, threads: int = 1, **labeler_kwargs: Any) -> None:
        # rayon sizes its pool from this variable on the first model call; without it every worker would
        # start one thread per core of the node and the workers would fight over the cores.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        self.labeler = Labeler(**labeler_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {column: [] for column in COLUMNS}

        def add(path: str, task: str | None, result: Any, error: str | None) -> None:
            for column, value in zip(COLUMNS, (path, task, result, error)):
                rows[column].append(value)

        images, paths = [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            image, error = try_load_image(data)
            if error is None:
                images.append(image)
                paths.append(str(path))
            else:
                add(str(path), None, None, error)
        if images:
            for path, result in zip(paths, self.labeler.label_or_errors(images)):
                if isinstance(result, str):
                    add(path, None, None, result)
                    continue
                for record in result:
                    # Answers differ in shape from task to task; as JSON text they fit one Arrow column.
                    add(path, record["task"], json.dumps(record["result"]), None)
        return rows


def label_images(paths: str | Sequence[str], *, workers: int = 1, threads_per_worker: int = 1,
                 batch_size: int = 4, skip: Collection[str] = (), **labeler_kwargs: Any):
    """A lazy Ray dataset of labels for the images under `paths` (files or folders, local or on storage that
    Ray reads, such as s3://).

    Args:
        paths: image files or folders.
        workers: how many model copies (Ray actors) label in parallel.
        threads_per_worker: CPUs Ray reserves for each worker, and the threads its model uses.
        batch_size: images per model call.
        skip: paths not to label, as Ray names them in the "path" column (`labeled_paths` of an earlier run's
            output). The files under `paths` are listed first (as Ray lists them) and only the others are read.
        **labeler_kwargs: `Labeler` arguments: model, tasks, text, dtype, max_new_tokens, num_beams.

    Returns:
        A `ray.data.Dataset` with the columns path, task, result (JSON text) and error.

    Raises:
        FileNotFoundError: with `skip`, a path that does not exist.
        ValueError: with `skip`, paths on different filesystems.
    """
    import ray.data

    if skip:
        filesystem, listed = _list_files([paths] if isinstance(paths, str) else list(paths))
        skip = frozenset(skip)
        remaining = [path for path in listed if path not in skip]
        if not remaining:
            return ray.data.from_items([])
        files = ray.data.read_binary_files(remaining, include_paths=True, filesystem=filesystem)
    else:
        files = ray.data.read_binary_files(paths, include_paths=True)
    return files.map_batches(
        RayLabeler,
        fn_constructor_kwargs={"threads": threads_per_worker, **labeler_kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=threads_per_worker,
    )


def labeled_paths(output: str, tasks: Sequence[str]) -> set[str]:
    """The images an output folder of `label_images(...).write_json(output)` holds a result for, for every one
    of `tasks`; rows with an error do not count, so those images are labeled again.

    Args:
        output: the folder (local, or a URI pyarrow reads, such as s3://); one that does not exist holds none.
        tasks: task tokens or names.

    Raises:
        ValueError: a file of the folder holds a line that is not a JSON record (only a last line cut short by
            a stopped job is passed over).
    """
    from pyarrow import fs

    filesystem, folder = _filesystem(output)
    if filesystem.get_file_info(folder).type == fs.FileType.NotFound:
        return set()
    pairs: set[tuple[str, str]] = set()
    for info in filesystem.get_file_info(fs.FileSelector(folder)):
        if info.type == fs.FileType.File and info.base_name.endswith(".json"):
            with filesystem.open_input_stream(info.path) as stream:
                records, _ = read_json_lines(stream.read(), info.path)
            pairs |= labeled_pairs(records, "path")
    wanted = [task_token(t) for t in tasks]
    by_path: dict[str, set[str]] = {}
    for path, task in pairs:
        by_path.setdefault(path, set()).add(task)
    return {path for path, done in by_path.items() if done.issuperset(wanted)}


def _list_files(paths: Sequence[str]):
    """(filesystem, files): the files `read_binary_files` reads for `paths` (a file as it is, a folder's files
    recursively but for those whose path below it starts with "." or "_", as Ray leaves them out), named as Ray
    names them in the "path" column.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: paths on different filesystems (Ray reads one).
    """
    from pyarrow import fs

    filesystem, files = None, []
    for path in paths:
        path_filesystem, base = _filesystem(path)
        if filesystem is None:
            filesystem = path_filesystem
        elif path_filesystem.type_name != filesystem.type_name:
            raise ValueError(f"{path} is on another filesystem ({path_filesystem.type_name}) than the paths before "
                             f"it ({filesystem.type_name}); label them in separate jobs")
        info = path_filesystem.get_file_info(base)
        if info.type == fs.FileType.NotFound:
            raise FileNotFoundError(f"{path}: no such file or folder")
        if info.type != fs.FileType.Directory:
            files.append(info.path)
            continue
        for entry in path_filesystem.get_file_info(fs.FileSelector(base, recursive=True)):
            relative = entry.path[len(base):].lstrip("/")
            if entry.type == fs.FileType.File and not relative.startswith((".", "_")):
                files.append(entry.path)
    return filesystem, files


def _largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node (ray.nodes()), the most one actor can reserve."""
    import ray

    return max((node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Labels a folder into JSON files; connects to the cluster at --address, else starts Ray locally."""
    import ray

    parser = argparse.ArgumentParser(prog="python -m florence2_rs.apps.ray_labeling",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("images", help="folder (or file, or s3://...) of images")
    parser.add_argument("output", help="folder to write the JSON lines into")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or checkpoint folder on every node")
    parser.add_argument("--task", action="append", help="task token; repeat for several (default: <OD>)")
    parser.add_argument("--text", help="the input of tasks that take one")
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument("--threads-per-worker", type=positive_int, default=1)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--max-new-tokens", type=positive_int, default=1024)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the images the output folder already holds a result for (a job stopped "
                             "part-way); without it, an output folder that holds rows is refused")
    args = parser.parse_args(argv)
    tasks = args.task or ["<OD>"]
    done: set[str] = set()
    try:
        if args.resume:
            done = labeled_paths(args.output, tasks)
        elif _holds_files(args.output):
            parser.error(f"{args.output} already holds labels: pass --resume to label only the images it has no "
                         "result for, or name another folder")
    except ValueError as err:
        parser.error(str(err))
    ray.init(address=args.address, include_dashboard=False)
    try:
        # An actor asking for more CPUs than any node has would wait for ever to be scheduled.
        largest = _largest_node_cpus()
        if args.threads_per_worker > largest:
            parser.error(f"--threads-per-worker {args.threads_per_worker} is more than the {largest:g} CPUs of the "
                         "cluster's largest node: a worker could never be scheduled; give at most that many")
        label_images(args.images, workers=args.workers, threads_per_worker=args.threads_per_worker,
                     batch_size=args.batch_size, skip=done, model=args.model, tasks=tasks,
                     text=args.text, max_new_tokens=args.max_new_tokens).write_json(args.output)
    finally:
        ray.shutdown()
    return 0


def _holds_files(output: str) -> bool:
    """Whether the output folder exists and holds a file of rows (`*.json`, what `write_json` writes)."""
    from pyarrow import fs

    filesystem, folder = _filesystem(output)
    if filesystem.get_file_info(folder).type != fs.FileType.Directory:
        return False
    return any(info.type == fs.FileType.File and info.base_name.endswith(".json")
               for info in filesystem.get_file_info(fs.FileSelector(folder)))


def _filesystem(location: str):
    """(pyarrow filesystem, path in it) of a file or folder: a URI (s3://...) or a local path."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(location if "://" in location else os.path.abspath(location))


if __name__ == "__main__":
    raise SystemExit(main())
