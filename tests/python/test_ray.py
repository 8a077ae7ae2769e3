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

from florence2_rs.ray_labeling import label_images  # noqa: E402


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
