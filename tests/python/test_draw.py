"""florence2_rs.apps.draw.draw on hand-made answers of every shape post_process_generation returns."""

from __future__ import annotations

import numpy as np
import pytest
import skimage
from PIL import Image

from florence2_rs.apps.draw import draw

POLYGON = [[180, 30, 330, 30, 350, 150, 300, 230, 200, 230, 160, 150]]
# One answer of each shape, as post_process_generation returns them for a 512×512 image.
ANSWERS = {
    "<OD>": {"bboxes": [[170, 20, 340, 230], [40, 250, 500, 500]], "labels": ["helmet", "person"],
             "scores": [0.91, 0.62]},
    "<REGION_PROPOSAL>": {"bboxes": [[170, 20, 340, 230]], "labels": [""]},
    "<CAPTION_TO_PHRASE_GROUNDING>": {"bboxes": [[170, 20, 340, 230]], "labels": ["a woman"]},
    "<OCR_WITH_REGION>": {"quad_boxes": [[30, 40, 250, 50, 245, 100, 25, 90]], "labels": ["NASA 1984"]},
    "<REFERRING_EXPRESSION_SEGMENTATION>": {"polygons": [POLYGON], "labels": [""]},
    "<OPEN_VOCABULARY_DETECTION>": {"bboxes": [], "bboxes_labels": [], "polygons": [POLYGON],
                                    "polygons_labels": ["helmet"]},
}


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def _changed(before: Image.Image, after: Image.Image, x: int, y: int) -> bool:
    return np.abs(np.asarray(before, np.int16)[y, x] - np.asarray(after, np.int16)[y, x]).sum() > 30


@pytest.mark.parametrize("task", sorted(ANSWERS))
def test_shapes_are_drawn_where_the_answer_puts_them(astronaut, task, tmp_path):
    picture = draw(astronaut, {task: ANSWERS[task]})
    picture.save(tmp_path / "picture.png")  # a PNG that opens: what --draw writes
    assert picture.mode == "RGB" and picture.width == astronaut.width and picture.height > astronaut.height
    answer = ANSWERS[task]
    if answer.get("bboxes"):
        x1, y1, x2, y2 = answer["bboxes"][0]
        assert _changed(astronaut, picture, x1, (y1 + y2) // 2)  # on the left edge
        assert not _changed(astronaut, picture, (x1 + x2) // 2, (y1 + y2) // 2)  # inside, untouched
    elif "quad_boxes" in answer:
        quad = answer["quad_boxes"][0]
        assert _changed(astronaut, picture, quad[4], quad[5])  # a corner of the outline
    else:
        assert _changed(astronaut, picture, 260, 130)  # the translucent mask's inside
        assert not _changed(astronaut, picture, 20, 480)  # far from it


def test_confidence_and_label_tags_are_drawn(astronaut):
    """With scores the tag is wider (it holds "helmet 0.91"), and it sits above the box."""
    answer = ANSWERS["<OD>"]
    unscored = {key: value for key, value in answer.items() if key != "scores"}
    with_scores = np.asarray(draw(astronaut, {"<OD>": answer}))
    without = np.asarray(draw(astronaut, {"<OD>": unscored}))
    x1, y1 = answer["bboxes"][0][:2]
    tag_row = y1 - 3  # inside the tag above the top-left corner
    assert (with_scores[tag_row] != without[tag_row]).any()


def test_text_answers_go_in_the_band_under_the_picture(astronaut):
    caption = "An astronaut in a white suit stands before an American flag, holding a helmet. " * 3
    short = draw(astronaut, {"<CAPTION>": "An astronaut."})
    long = draw(astronaut, {"<MORE_DETAILED_CAPTION>": caption})
    assert np.array_equal(np.asarray(short)[: astronaut.height], np.asarray(astronaut))  # picture untouched
    assert long.height > short.height  # long captions wrap onto more lines
    band = np.asarray(long)[astronaut.height:]
    assert (band < 100).any()  # dark text on the white band


def test_several_tasks_give_one_panel_each(astronaut):
    result = {**{task: ANSWERS[task] for task in ("<OD>", "<OCR_WITH_REGION>")}, "<CAPTION>": "An astronaut."}
    sheet = draw(astronaut, result)
    assert sheet.width >= 3 * astronaut.width


def test_small_pictures_are_enlarged_and_arrays_and_empty_answers_are_accepted(astronaut):
    small = np.asarray(astronaut.resize((128, 128)))
    picture = draw(small, {"<OD>": {"bboxes": [[40, 5, 85, 57]], "labels": ["helmet"]}})
    assert picture.width == 512
    empty = draw(astronaut, {"<OD>": {"bboxes": [], "labels": []}})
    assert np.array_equal(np.asarray(empty)[: astronaut.height], np.asarray(astronaut))
