"""Adversarial inputs, each in its own Python process: a bad checkpoint file, config, image, array, Hub id or
generate() setting must end in an exception of the kind transformers raises (ValueError for a bad argument,
OSError for a bad file or checkpoint), or in a result where transformers gives one; never in an abort, a
segfault, a hang or a Rust panic (pyo3's PanicException is a BaseException, not an Exception).

The process of a case runs its snippet and prints what came of it as JSON on its last line. The test checks
that the process exited normally (a negative return code is the signal that killed it), within the time
limit, and that the outcome is the expected one, with a message that says what was wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Seconds a case may take: loading the tiny checkpoint and one short generation take a few.
TIMEOUT = 120
RESULT_MARK = "@@outcome@@"

# Runs the snippet on stdin with CKPT (the HF-layout checkpoint), ORIG (the original layout) and BAD (the
# folder of broken files) defined; prints the outcome.
HARNESS = textwrap.dedent(f"""
    import json, sys
    from pathlib import Path
    snippet = sys.stdin.read()
    scope = {{"CKPT": Path(sys.argv[1]), "ORIG": Path(sys.argv[2]), "BAD": Path(sys.argv[3])}}
    try:
        exec(compile(snippet, "<case>", "exec"), scope)
        outcome = {{"raised": None}}
    except BaseException as err:
        outcome = {{"raised": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__],
                    "exception": isinstance(err, Exception), "message": str(err)}}
    print("{RESULT_MARK}" + json.dumps(outcome))
""")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels and whose data holds almost none."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _safetensors(header: bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte header length (`length`, else the true one), the header, the data."""
    header = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(header) if length is None else length) + header + data


@pytest.fixture(scope="module")
def bad(end_to_end_checkpoint, tmp_path_factory) -> Path:
    """Broken copies of the end-to-end checkpoint and broken image files, each under a name the cases use."""
    source = end_to_end_checkpoint / "hf"
    root = tmp_path_factory.mktemp("adversarial")

    def copy(name: str) -> Path:
        folder = root / name
        shutil.copytree(source, folder)
        return folder

    def edit_json(folder: Path, file: str, edit) -> None:
        value = json.loads((folder / file).read_text())
        edit(value)
        (folder / file).write_text(json.dumps(value))

    key = "model.vision_tower.convs.0.conv.weight"
    weights = {
        "st_header_past_end": _safetensors("{}", length=10**6),
        "st_header_length_2_63": _safetensors("{}", length=2**63),
        "st_garbage_json": _safetensors(b"{not json at all\xff"),
        "st_not_an_object": _safetensors("[1, 2, 3]"),
        "st_offsets_out_of_range": _safetensors(
            f'{{"{key}":{{"dtype":"F32","shape":[4],"data_offsets":[0,1000000]}}}}', b"\0" * 16),
        "st_bytes_do_not_match_shape": _safetensors(
            f'{{"{key}":{{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}}}', b"\0" * 8),
        "st_shape_overflows": _safetensors(
            f'{{"{key}":{{"dtype":"F32","shape":[{2**62},{2**62}],"data_offsets":[0,16]}}}}', b"\0" * 16),
        "st_unknown_dtype": _safetensors(
            f'{{"{key}":{{"dtype":"Q7","shape":[4],"data_offsets":[0,4]}}}}', b"\0" * 4),
        "st_shorter_than_its_length": b"\x05\0\0",
        "st_one_tensor_only": _safetensors(
            f'{{"{key}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}', b"\0" * 4),
    }
    for name, content in weights.items():
        (copy(name) / "model.safetensors").write_bytes(content)
    for name, shard in (("index_escapes", "../../outside.safetensors"), ("index_missing_shard", "nowhere.safetensors")):
        folder = copy(name)
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {key: shard}}))

    tokenizer = (source / "tokenizer.json").read_text()
    for name, content in (("tok_garbage", "\x00\x01 not json"), ("tok_empty", ""), ("tok_empty_object", "{}"),
                          ("tok_truncated", tokenizer[: len(tokenizer) // 2])):
        (copy(name) / "tokenizer.json").write_text(content)

    def drop_bos(value):
        value["model"]["vocab"].pop("<s>", None)
        value["added_tokens"] = [t for t in value["added_tokens"] if t["content"] != "<s>"]

    edit_json(copy("tok_no_bos"), "tokenizer.json", drop_bos)
    (copy("tok_config_garbage") / "tokenizer_config.json").write_text("{model_max_length: ")

    preprocessor = {
        "pre_huge_size": lambda c: c.update(size={"height": 100000, "width": 100000}),
        "pre_huge_seq_length": lambda c: c.update(image_seq_length=10**12),
        "pre_negative_size": lambda c: c.update(size={"height": -1, "width": 768}),
        "pre_rescale_not_a_number": lambda c: c.update(rescale_factor="x"),
    }
    # transformers 5 writes the image settings into processor_config.json's "image_processor".
    for name, edit in preprocessor.items():
        edit_json(copy(name), "processor_config.json", lambda c, edit=edit: edit(c["image_processor"]))
    (copy("pre_garbage") / "processor_config.json").write_text("{]")

    config = {
        "cfg_window_100000": lambda c: c["vision_config"].update(window_size=100000),
        "cfg_window_2_40": lambda c: c["vision_config"].update(window_size=2**40),
        "cfg_patch_padding": lambda c: c["vision_config"].update(
            patch_padding=[1000000] + c["vision_config"]["patch_padding"][1:]),
    }
    for name, edit in config.items():
        edit_json(copy(name), "config.json", edit)

    images = root / "images"
    images.mkdir()
    (images / "bomb.png").write_bytes(_png_declaring(100000, 100000))
    Image.new("RGB", (16, 12), "red").save(images / "bad_exif.png", exif=b"garbage, not a TIFF header")
    Image.new("RGB", (64, 48), "blue").save(images / "good.png")
    good = (images / "good.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "junk.jpg").write_bytes(b"not an image")
    (images / "folder.png").mkdir()

    # A Hub cache whose repository "org/name" has a branch "main" pointing outside, and a checkpoint planted
    # where a revision "../../x" would lead.
    cache = root / "hub"
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    (repo / "refs" / "main").write_text("../../../x")
    shutil.copytree(source, cache / "x")
    shutil.copytree(source, root / "x")
    return root


def _run(snippet: str, end_to_end_checkpoint: Path, bad: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAYON_NUM_THREADS": "2"}
    env.pop("FLORENCE2_MAX_ALLOC_BYTES", None)  # the default limit, whatever the caller's shell says
    args = [sys.executable, "-c", HARNESS, str(end_to_end_checkpoint / "hf"), str(end_to_end_checkpoint / "original"),
            str(bad)]
    try:
        done = subprocess.run(args, input=textwrap.dedent(snippet), capture_output=True, text=True,
                              timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the case hung (no end within {TIMEOUT} s)")
    assert done.returncode == 0, f"the process died (return code {done.returncode}):\n{done.stderr[-3000:]}"
    marked = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert marked, f"no outcome printed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return json.loads(marked[-1][len(RESULT_MARK):])


LOAD = "from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration as M\n"
# A model, and the inputs of one <OD> prompt on a small picture.
INPUTS = LOAD + textwrap.dedent("""
    import numpy as np
    from PIL import Image
    processor = AutoProcessor.from_pretrained(CKPT)
    model = M.from_pretrained(CKPT)
    inputs = processor(text="<OD>", images=Image.new("RGB", (64, 48), "red"), return_tensors="np")
""")
PROCESS = LOAD + "import numpy as np\nprocessor = AutoProcessor.from_pretrained(CKPT)\n"


def _image_call(expression: str) -> str:
    return PROCESS + f"processor(text='<OD>', images={expression})\n"


def _label_folder_with_the_cli() -> str:
    """The command on the folder of bad files: every file gets a line, the good one is labeled, status 1."""
    return textwrap.dedent("""
        import contextlib, io, json
        from pathlib import Path
        from florence2_rs.apps.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["--model", str(CKPT), "--max-new-tokens", "4", "--num-beams", "1", "--quiet",
                           str(BAD / "images")])
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        by_file = {Path(r["file"]).name: r for r in records}
        assert status == 1, status
        bad = {"bomb.png", "bad_exif.png", "truncated.png", "empty.png", "junk.jpg"}
        assert set(by_file) == bad | {"good.png"}, sorted(by_file)
        assert "error" not in by_file["good.png"], by_file["good.png"]
        for name in bad:
            assert by_file[name]["error"].startswith("cannot read the image: "), by_file[name]
        assert "DecompressionBombError" in by_file["bomb.png"]["error"]
        assert "SyntaxError" in by_file["bad_exif.png"]["error"]
    """)


def _threads_at_once() -> str:
    """Good and bad calls from several threads at once: each thread gets its own answer or exception."""
    return INPUTS + textwrap.dedent("""
        from concurrent.futures import ThreadPoolExecutor
        calls = [
            lambda: model.generate(**inputs, max_new_tokens=3, num_beams=1).shape[0],
            lambda: processor(text="<OD>", images=str(BAD / "images" / "bomb.png")),
            lambda: model.generate(**inputs, max_new_tokens=-1),
            lambda: processor(text="<OD>", images=np.zeros((0, 5, 3), np.uint8)),
            lambda: model.generate(**inputs, max_new_tokens=3, num_beams=2).shape[0],
        ]
        def outcome(call):
            try:
                return call()
            except Exception as err:
                return type(err).__name__
        with ThreadPoolExecutor(len(calls)) as pool:
            got = list(pool.map(outcome, calls))
        assert got == [1, "DecompressionBombError", "ValueError", "ValueError", 1], got
    """)


# (case, snippet, accepted exception names (None: a result), pattern the message must match)
CASES = [
    # safetensors headers
    *[(f"weights: {name}", LOAD + f"M.from_pretrained(BAD / '{name}')", ("OSError",),
       r"model\.safetensors.*(truncated or corrupt|missing tensor|does not fit these weights)")
      for name in ("st_header_past_end", "st_header_length_2_63", "st_garbage_json", "st_not_an_object",
                   "st_offsets_out_of_range", "st_bytes_do_not_match_shape", "st_shape_overflows",
                   "st_unknown_dtype", "st_shorter_than_its_length", "st_one_tensor_only")],
    ("weights: index shard outside the folder", LOAD + "M.from_pretrained(BAD / 'index_escapes')", ("OSError",),
     "not a file name inside the repository"),
    ("weights: index names a missing shard", LOAD + "M.from_pretrained(BAD / 'index_missing_shard')",
     ("FileNotFoundError",), "nowhere.safetensors.*not found"),
    # tokenizer files
    *[(f"tokenizer: {name}", LOAD + f"AutoProcessor.from_pretrained(BAD / '{name}')", ("OSError",),
       r"tokenizer\.json.*(not a usable tokenizer file|truncated or corrupt)")
      for name in ("tok_garbage", "tok_empty", "tok_empty_object", "tok_truncated")],
    ("tokenizer: vocabulary without <s>", LOAD + "AutoProcessor.from_pretrained(BAD / 'tok_no_bos')", ("OSError",),
     "tokenizer.json.*no <s> token"),
    ("tokenizer: tokenizer_config.json garbage", LOAD + "AutoProcessor.from_pretrained(BAD / 'tok_config_garbage')",
     ("OSError",), "tokenizer_config.json"),
    # processor configs
    ("processor config: size 100000x100000", LOAD + "AutoProcessor.from_pretrained(BAD / 'pre_huge_size')",
     ("OSError",), r"processor_config\.json.*size 100000x100000.*needs .*GiB.*FLORENCE2_MAX_ALLOC_BYTES"),
    ("processor config: image_seq_length 10**12",
     LOAD + "AutoProcessor.from_pretrained(BAD / 'pre_huge_seq_length')", ("OSError",),
     r"processor_config\.json.*image_seq_length 1000000000000.*needs"),
    ("processor config: negative size", LOAD + "AutoProcessor.from_pretrained(BAD / 'pre_negative_size')",
     ("OSError",), r"processor_config\.json.*size must be"),
    ("processor config: rescale_factor not a number",
     LOAD + "AutoProcessor.from_pretrained(BAD / 'pre_rescale_not_a_number')", ("OSError",), "rescale_factor"),
    ("processor config: garbage JSON", LOAD + "AutoProcessor.from_pretrained(BAD / 'pre_garbage')", ("OSError",),
     r"processor_config\.json"),
    # model configs (their validation is the model's)
    ("model config: window_size 100000", LOAD + "M.from_pretrained(BAD / 'cfg_window_100000')",
     ("OSError", "ValueError"), "window_size"),
    ("model config: window_size 2**40", LOAD + "M.from_pretrained(BAD / 'cfg_window_2_40')",
     ("OSError", "ValueError"), "window_size"),
    ("model config: patch_padding 1000000", LOAD + "M.from_pretrained(BAD / 'cfg_patch_padding')",
     ("OSError", "ValueError"), "patch_padding"),
    # image files
    ("image file: declares 100000x100000 pixels", _image_call("str(BAD / 'images' / 'bomb.png')"),
     ("DecompressionBombError",), "exceeds limit"),
    ("image file: corrupt EXIF", _image_call("str(BAD / 'images' / 'bad_exif.png')"), ("SyntaxError",),
     "not a TIFF file"),
    ("image file: truncated", _image_call("str(BAD / 'images' / 'truncated.png')"), ("OSError",), "truncated"),
    ("image file: empty", _image_call("str(BAD / 'images' / 'empty.png')"), ("OSError",), "cannot identify"),
    ("image file: a folder", _image_call("str(BAD / 'images' / 'folder.png')"), ("OSError",), "folder.png"),
    # image arrays
    ("array: zero height", _image_call("np.zeros((0, 10, 3), np.uint8)"), ("ValueError",), "empty image"),
    ("array: zero width float", _image_call("np.zeros((10, 0, 3), np.float32)"), ("ValueError",), "empty image"),
    ("array: NaN", _image_call("np.full((8, 8, 3), np.nan, np.float32)"), ("ValueError",), "NaN"),
    ("array: infinity", _image_call("np.full((8, 8, 3), np.inf, np.float64)"), ("ValueError",), "infinite"),
    ("array: complex dtype", _image_call("np.zeros((8, 8, 3), np.complex64)"), ("ValueError",), "dtype complex64"),
    ("array: object dtype", _image_call("np.full((8, 8, 3), None, object)"), ("ValueError",), "dtype object"),
    ("array: strings", _image_call("np.full((8, 8, 3), 'x')"), ("ValueError",), "dtype <U1"),
    ("array: rank 1", _image_call("np.zeros(12, np.uint8)"), ("ValueError",), "dimensions: 1"),
    ("array: rank 5", _image_call("np.zeros((1, 1, 4, 4, 3), np.uint8)"), ("ValueError",), "dimensions: 5"),
    ("array: two channels", _image_call("np.zeros((8, 8, 2), np.uint8)"), ("ValueError",), "channel dimension"),
    ("array: values past 255", _image_call("np.full((8, 8, 3), 1000, np.int64)"), ("ValueError",), "range"),
    ("array: 100000x100000 (a broadcast view)",
     _image_call("np.broadcast_to(np.uint8(7), (100000, 100000, 3))"), ("MemoryError",),
     r"shape \(100000, 100000, 3\) needs .*FLORENCE2_MAX_ALLOC_BYTES"),
    ("array: bool", _image_call("np.ones((8, 8, 3), bool)"), None, ""),
    ("array: float16 in [0, 1]", _image_call("np.full((8, 8, 3), 0.5, np.float16)"), None, ""),
    ("image: PIL 100000x100000 lazily opened past the bomb check",
     PROCESS + textwrap.dedent("""
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None
        processor(text="<OD>", images=Image.open(BAD / "images" / "bomb.png"))
     """), ("MemoryError",), r"100000x100000 image to RGB needs"),
    # decoding and post-processing
    ("decode: negative id", PROCESS + "processor.batch_decode([[-1]])", ("OverflowError",), "from 0 to 4294967295"),
    ("decode: id past the vocabulary", PROCESS + "assert processor.batch_decode([[10**9]]) == ['']", None, ""),
    ("post-process: huge location tokens, zero image size",
     PROCESS + "processor.post_process_generation('<loc_99999999999999999999><loc_5>x', task='<OD>', "
               "image_size=(0, 0))", None, ""),
    ("post-process: NaN image size",
     PROCESS + "processor.post_process_generation('a<loc_1><loc_2><loc_3><loc_4>', task='<OD>', "
               "image_size=(float('nan'), -1e308))", None, ""),
    # the Hub
    ("hub: model revision ../../x", LOAD + "M.from_pretrained('org/name', revision='../../x', cache_dir=BAD / 'hub')",
     ("ValueError",), r"Invalid revision [\"']\.\./\.\./x[\"']"),
    ("hub: processor revision ../../x",
     LOAD + "AutoProcessor.from_pretrained('org/name', revision='../../x', cache_dir=BAD / 'hub')",
     ("ValueError",), r"Invalid revision [\"']\.\./\.\./x[\"']"),
    ("hub: revision with a backslash",
     LOAD + r"M.from_pretrained('org/name', revision='..\\..\\x', cache_dir=BAD / 'hub')", ("ValueError",),
     "Invalid revision"),
    ("hub: ref file pointing outside the cache", LOAD + "M.from_pretrained('org/name', cache_dir=BAD / 'hub')",
     ("FileNotFoundError",), "Offline mode"),
    ("hub: repo id with two slashes", LOAD + "M.from_pretrained('a/b/c', cache_dir=BAD / 'hub')", ("OSError",),
     "neither a local folder nor a Hugging Face Hub repo id"),
    ("hub: repo id ending in .git", LOAD + "AutoProcessor.from_pretrained('org/name.git', cache_dir=BAD / 'hub')",
     ("OSError",), "neither a local folder nor a Hugging Face Hub repo id"),
    # generation and model inputs (their limits are the model's)
    *[(f"generate: num_beams={label}", INPUTS + f"model.generate(**inputs, num_beams={value}, max_new_tokens=2)",
       ("ValueError", "MemoryError"), "num_beams")
      for label, value in (("10**6", 10**6), ("10**7", 10**7), ("2**63", 2**63))],
    ("generate: max_new_tokens=2**64-1", INPUTS + f"model.generate(**inputs, max_new_tokens={2**64 - 1})",
     ("ValueError",), r"^(?!.*max_length is set to 0).*max_new_tokens"),
    *[(f"forward: zero-height pixel_values, {dtype}",
       LOAD + f"import numpy as np\nM.from_pretrained(CKPT, dtype='{dtype}').get_image_features("
              "np.zeros((1, 3, 0, 768), np.float32))", ("ValueError",), "pixel_values|height|empty")
      for dtype in ("float32", "float16")],
    ("generate: transformers.GenerationConfig(num_beams=2)",
     INPUTS + "import transformers\n"
              "model.generate(**inputs, generation_config=transformers.GenerationConfig(num_beams=2, "
              "max_new_tokens=3))", None, ""),
    # quantization_config: misread values loaded a model quantized (or not) without a word; transformers'
    # exception types (tests/python/test_quantize.py compares them with transformers run live)
    ("quantization_config: load_in_4bit 'false'",
     LOAD + "M.from_pretrained(CKPT, quantization_config={'load_in_4bit': 'false'})", ("TypeError",),
     "load_in_4bit must be a boolean"),
    ("quantization_config: both flags",
     LOAD + "M.from_pretrained(CKPT, quantization_config={'load_in_4bit': True, 'load_in_8bit': True})",
     ("ValueError",), "only one can be used"),
    ("quantization_config: the string 'int8'", LOAD + "M.from_pretrained(CKPT, quantization_config='int8')",
     ("AttributeError",), "must be a BitsAndBytesConfig"),
    ("quantization_config: GPTQ", LOAD + "M.from_pretrained(CKPT, quantization_config={'quant_method': 'gptq', "
                                         "'bits': 4})", ("ValueError",), "'gptq' is not supported"),
    # whole runs
    ("cli: a folder of bad files", _label_folder_with_the_cli(), None, ""),
    ("threads: bad and good calls at once", _threads_at_once(), None, ""),
]


@pytest.mark.parametrize("snippet, expected, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_an_exception_not_a_crash(end_to_end_checkpoint, bad, snippet, expected, pattern):
    outcome = _run(snippet, end_to_end_checkpoint, bad)
    if expected is None:
        assert outcome["raised"] is None, f"expected a result, got {outcome}"
        return
    assert outcome["raised"] is not None, f"expected {expected}, got a result"
    assert outcome["exception"] and "PanicException" not in outcome["mro"], f"a crash in disguise: {outcome}"
    assert set(expected) & set(outcome["mro"]), f"expected {expected}, got {outcome}"
    assert outcome["message"].strip(), f"an empty message: {outcome}"
    assert re.search(pattern, outcome["message"], flags=re.DOTALL), outcome["message"]


def _transparent_png(path: Path) -> None:
    red = np.zeros((20, 30, 4), np.uint8)
    red[..., 0] = 200
    red[:10, ..., 3] = 255  # the top half opaque, the bottom half fully transparent
    Image.fromarray(red, "RGBA").save(path)


def _rotated_jpeg(path: Path) -> None:
    image = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image.save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("make", [_transparent_png, _rotated_jpeg], ids=["transparent PNG", "EXIF-rotated JPEG"])
def test_image_files_give_transformers_pixels(end_to_end_checkpoint, tmp_path, make):
    """A path is read as transformers' load_image reads it: upright by its EXIF orientation, alpha dropped."""
    from transformers import AutoProcessor as ReferenceProcessor

    from florence2_rs import AutoProcessor

    path = tmp_path / ("image.png" if make is _transparent_png else "image.jpg")
    make(path)
    ours = AutoProcessor.from_pretrained(end_to_end_checkpoint / "hf")(
        text="<OD>", images=str(path), return_tensors="np")["pixel_values"]
    theirs = ReferenceProcessor.from_pretrained(end_to_end_checkpoint / "hf")(
        text="<OD>", images=str(path), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# Pillow modes a caller may hand the processor; transformers converts each to RGB (transparency onto white).
MODES = ["I;16", "CMYK", "LA", "PA", "P", "1", "F", "I", "L", "RGBA", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
def test_odd_image_modes_give_transformers_pixels(end_to_end_checkpoint, mode):
    from transformers import AutoProcessor as ReferenceProcessor

    from florence2_rs import AutoProcessor

    gradient = np.linspace(0, 255, 24 * 32 * 4).reshape(24, 32, 4).astype(np.uint8)
    image = Image.fromarray(gradient, "RGBA").convert(mode)
    if mode == "P":
        image.info["transparency"] = 3
    ours = AutoProcessor.from_pretrained(end_to_end_checkpoint / "hf")(
        text="<OD>", images=image, return_tensors="np")["pixel_values"]
    theirs = ReferenceProcessor.from_pretrained(end_to_end_checkpoint / "hf")(
        text="<OD>", images=image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
