"""The Ray Data labeling example, in Ray's local mode on a few images."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import skimage
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from florence2_rs.apps.ray_labeling import label_images  # noqa: E402


def _descendants(pid: int) -> set[int]:
    """Processes below `pid` (Linux /proc); Ray's local mode starts its servers and workers there."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command may hold spaces and parentheses; the fields after the last ")" are fixed.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while being read
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture
def local_ray():
    """Ray on this machine with two CPUs and no dashboard, shut down afterwards; checks nothing is left."""
    if not Path("/proc").is_dir():
        pytest.skip("the check for leftover processes reads /proc")
    before = _descendants(os.getpid())
    # A small object store: the rows are tiny, and CI containers often have a small /dev/shm.
    ray.init(num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()
    deadline = time.monotonic() + 15  # shutdown signals Ray's processes; give them a moment to exit
    while not _descendants(os.getpid()) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _descendants(os.getpid()) <= before, "Ray left processes behind"


def test_labels_a_folder_with_one_model_per_worker(end_to_end_checkpoint, tmp_path, local_ray):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpg")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    dataset = label_images(str(folder), workers=1, threads_per_worker=1, batch_size=2,
                           model=str(end_to_end_checkpoint / "hf"), tasks=["<OD>", "<CAPTION>"],
                           max_new_tokens=4, num_beams=1)
    rows = sorted(dataset.take_all(), key=lambda r: (r["path"], r["task"] or ""))
    assert [(Path(r["path"]).name, r["task"]) for r in rows] == [
        ("astronaut.jpg", "<CAPTION>"), ("astronaut.jpg", "<OD>"), ("broken.jpg", None),
        ("coffee.png", "<CAPTION>"), ("coffee.png", "<OD>")]
    assert "cannot read the image" in rows[2]["error"]
    for row in rows[:2] + rows[3:]:
        assert row["error"] is None
        result = json.loads(row["result"])
        assert isinstance(result, str) if row["task"] == "<CAPTION>" else set(result) >= {"bboxes", "labels"}


def test_a_resumed_job_labels_only_what_the_output_folder_lacks(end_to_end_checkpoint, tmp_path, local_ray,
                                                                monkeypatch):
    """An output folder written part-way (a job over two of the images, the last row cut short as a stopped job
    leaves it, and a row with an error): resuming labels the image without rows, the one whose row was cut
    short and the one that failed, and nothing the folder already holds; the skipped images are not read."""
    import ray.data

    from florence2_rs.apps.ray_labeling import labeled_paths

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(skimage.data.coffee()[: 60 + len(name), :80]).save(folder / name)
    settings = {"workers": 1, "threads_per_worker": 1, "batch_size": 1, "model": str(end_to_end_checkpoint / "hf"),
                "tasks": ["<OD>"], "max_new_tokens": 4, "num_beams": 1}
    output = tmp_path / "labels"
    label_images([str(folder / "a.png"), str(folder / "b.png")], **settings).write_json(str(output))
    written = sorted(output.glob("*.json"))
    rows = [json.loads(line) for file in written for line in file.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == ["a.png", "b.png"]
    a_rows = [r for r in rows if r["path"].endswith("a.png")]
    b_row = next(r for r in rows if r["path"].endswith("b.png"))
    c_error = {"path": str(folder / "c.png"), "task": None, "result": None,
               "error": "cannot read the image: OSError: gone"}
    for file in written:
        file.unlink()
    # a's row whole, c's an error, b's cut short: b and c are labeled again.
    (output / "part.json").write_text("".join(json.dumps(r) + "\n" for r in a_rows + [c_error])
                                      + json.dumps(b_row)[:25])
    done = labeled_paths(str(output), ["OD"])
    assert {Path(p).name for p in done} == {"a.png"}
    read, read_binary_files = [], ray.data.read_binary_files

    def recorded(paths, **kwargs):
        read.append(paths)
        return read_binary_files(paths, **kwargs)

    monkeypatch.setattr(ray.data, "read_binary_files", recorded)
    resumed = label_images(str(folder), skip=done, **settings).take_all()
    assert sorted(Path(r["path"]).name for r in resumed) == ["b.png", "c.png", "d.png"]
    assert all(r["error"] is None and r["task"] == "<OD>" for r in resumed)
    assert [sorted(Path(p).name for p in paths) for paths in read] == [["b.png", "c.png", "d.png"]]
    # Everything labeled: nothing is read, and the dataset is empty.
    assert label_images(str(folder), skip={str(folder / n) for n in ("a.png", "b.png", "c.png", "d.png")},
                        **settings).take_all() == []
    assert len(read) == 1


def test_the_command_resumes_into_its_output_folder(end_to_end_checkpoint, tmp_path, monkeypatch):
    """`main` end to end: a job over some images, then `--resume` over the folder with more images: the output
    folder ends with one row per image and task, the first job's rows kept and none written twice."""
    import functools

    from florence2_rs.apps.ray_labeling import main

    # main's own ray.init, on two CPUs with a small object store (see local_ray).
    monkeypatch.setattr(ray, "init", functools.partial(ray.init, num_cpus=2, object_store_memory=128 * 1024**2,
                                                       log_to_driver=False, configure_logging=False))
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(skimage.data.coffee()[: 60 + ord(name[0]) % 7, :80]).save(folder / name)
    output = tmp_path / "labels"
    command = [str(folder), str(output), "--model", str(end_to_end_checkpoint / "hf"), "--task", "<OD>",
               "--task", "<CAPTION>", "--max-new-tokens", "4", "--batch-size", "1"]
    assert main(command) == 0
    first = {file.name for file in output.glob("*.json")}
    for name in ("c.png", "d.png"):
        Image.fromarray(skimage.data.coffee()[: 60 + ord(name[0]) % 7, :80]).save(folder / name)
    with pytest.raises(SystemExit) as refused:
        main(command)  # without --resume: the folder holds rows
    assert refused.value.code == 2
    assert main([*command, "--resume"]) == 0
    files = sorted(output.glob("*.json"))
    assert first < {file.name for file in files}, "the first job's files are kept, the new rows in new files"
    rows = [json.loads(line) for file in files for line in file.read_text().splitlines()]
    pairs = [(Path(r["path"]).name, r["task"]) for r in rows]
    assert sorted(pairs) == sorted((name, task) for name in ("a.png", "b.png", "c.png", "d.png")
                                   for task in ("<CAPTION>", "<OD>"))
    assert all(r["error"] is None for r in rows)


def test_the_command_refuses_more_threads_per_worker_than_a_node_has(end_to_end_checkpoint, tmp_path):
    """An actor reserving more CPUs than any node has is never scheduled: the job would wait for ever. The
    command refuses it (exit 2) before the job starts."""
    import subprocess
    import sys

    (tmp_path / "images").mkdir()
    Image.fromarray(skimage.data.coffee()[:60, :80]).save(tmp_path / "images" / "a.png")
    try:
        done = subprocess.run([sys.executable, "-m", "florence2_rs.apps.ray_labeling", str(tmp_path / "images"),
                               str(tmp_path / "labels"), "--model", str(end_to_end_checkpoint / "hf"),
                               "--threads-per-worker", str(10 ** 6)], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the job waited for a worker that can never be scheduled")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--threads-per-worker 1000000 is more than the" in done.stderr
    assert not list((tmp_path / "labels").glob("*.json"))


def test_the_command_refuses_an_output_folder_that_holds_labels(tmp_path):
    """Without --resume, a folder that holds rows is a usage error (before Ray starts): the second job would
    add a second row per image beside the first."""
    from florence2_rs.apps.ray_labeling import main

    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "part.json").write_text('{"path": "x.png", "task": "<OD>", "result": "{}", "error": null}\n')
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), str(tmp_path / "labels")])
    assert exit_.value.code == 2


def test_only_files_of_rows_count_as_labels(tmp_path):
    """A folder with other files (a README, Ray's hidden files) but no `*.json` holds no labels."""
    from florence2_rs.apps.ray_labeling import _holds_files

    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "README.txt").write_text("labels of the spring batch\n")
    (tmp_path / "labels" / "_SUCCESS").write_text("")
    assert not _holds_files(str(tmp_path / "labels"))
    (tmp_path / "labels" / "part.json").write_text("")
    assert _holds_files(str(tmp_path / "labels"))
