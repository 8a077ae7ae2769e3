"""Labeling a folder of images at scale with Ray Data: each Ray worker loads the model once and labels
batches of images; the same code runs in Ray's local mode on one machine and on a Ray cluster.

    python -m florence2_rs.ray_labeling IMAGES_DIR OUTPUT_DIR [--model ID_OR_DIR] [--task TASK ...]
        [--workers N] [--threads-per-worker N] [--batch-size N] [--address ADDRESS]

Writes JSON lines (one row per image and task: path, task, result as a JSON string, error) into OUTPUT_DIR.
Files are read as bytes and decoded on the workers, so an unreadable file (or one the model cannot take)
becomes a row with an error instead of failing the job. Needs `pip install "ray[data]"`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import numpy as np

from .labeling import DEFAULT_MODEL, Labeler, try_load_image

#: The columns of the labeled dataset.
COLUMNS = ("path", "task", "result", "error")


class RayLabeler:
    """The callable class given to `Dataset.map_batches`: Ray builds one per worker (actor), which loads the
    model once, then calls it on batches of {"path", "bytes"} rows.

    Args:
        threads: CPU threads of this worker's model; match the `num_cpus` Ray reserves for the worker.
        **labeler_kwargs: `florence2_rs.labeling.Labeler` arguments (model, tasks, text, dtype, generation).
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
                 batch_size: int = 4, **labeler_kwargs: Any):
    """A lazy Ray dataset of labels for the images under `paths` (files or folders, local or on storage that
    Ray reads, such as s3://).

    Args:
        paths: image files or folders.
        workers: how many model copies (Ray actors) label in parallel.
        threads_per_worker: CPUs Ray reserves for each worker, and the threads its model uses.
        batch_size: images per model call.
        **labeler_kwargs: `Labeler` arguments: model, tasks, text, dtype, max_new_tokens, num_beams.

    Returns:
        A `ray.data.Dataset` with the columns path, task, result (JSON text) and error.
    """
    import ray.data

    files = ray.data.read_binary_files(paths, include_paths=True)
    return files.map_batches(
        RayLabeler,
        fn_constructor_kwargs={"threads": threads_per_worker, **labeler_kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=threads_per_worker,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Labels a folder into JSON files; connects to the cluster at --address, else starts Ray locally."""
    import ray

    parser = argparse.ArgumentParser(prog="python -m florence2_rs.ray_labeling", description=__doc__.split("\n")[0])
    parser.add_argument("images", help="folder (or file, or s3://...) of images")
    parser.add_argument("output", help="folder to write the JSON lines into")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or checkpoint folder on every node")
    parser.add_argument("--task", action="append", help="task token; repeat for several (default: <OD>)")
    parser.add_argument("--text", help="the input of tasks that take one")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False)
    try:
        label_images(args.images, workers=args.workers, threads_per_worker=args.threads_per_worker,
                     batch_size=args.batch_size, model=args.model, tasks=args.task or ["<OD>"], text=args.text,
                     max_new_tokens=args.max_new_tokens).write_json(args.output)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
