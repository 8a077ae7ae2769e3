"""florence2-mcp over stdio with the official `mcp` client session: the tools, their output schema, and their
structured results equal to the library's answers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys

import pytest
from PIL import Image

mcp = pytest.importorskip("mcp")  # needs Python >= 3.10

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from serve_support import library_answer, sample_images  # noqa: E402

from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration  # noqa: E402

MAX_NEW_TOKENS = 8


async def _session_calls(checkpoint, calls):
    """Starts florence2-mcp on `checkpoint` over stdio, lists its tools and runs `calls` (name, arguments)."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "florence2_rs.serve.mcp_server", "--model", str(checkpoint), "--threads", "1",
              "--max-new-tokens", str(MAX_NEW_TOKENS)],
        env={key: os.environ[key] for key in ("PYTHONPATH", "PATH", "HOME") if key in os.environ})
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            results = [await session.call_tool(name, arguments) for name, arguments in calls]
    return tools, results


def test_mcp_tools_over_stdio_answer_as_the_library(end_to_end_checkpoint, tmp_path):
    checkpoint = end_to_end_checkpoint / "hf"
    data = sample_images()["coffee"]
    path = tmp_path / "coffee.png"
    path.write_bytes(data)
    as_b64 = base64.b64encode(data).decode()
    calls = [
        ("caption", {"image": str(path)}),
        ("ocr", {"image": as_b64, "with_regions": True}),
        ("detect", {"image": "data:image/png;base64," + as_b64}),
        ("detect", {"image": str(path), "phrases": "a cup", "draw": True}),
        ("segment", {"image": str(path), "region": [100, 100, 600, 700]}),
        ("run_task", {"image": str(path), "task": "<DENSE_REGION_CAPTION>"}),
        ("run_task", {"image": str(path), "task": "<NOT_A_TASK>"}),
        ("detect", {"image": str(tmp_path / "missing.png")}),
        ("caption", {"image": base64.b64encode(b"\xff\xfe\xfd not an image").decode()}),  # base64 with a "/"
    ]
    tools, results = asyncio.run(_session_calls(checkpoint, calls))

    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == {"caption", "ocr", "detect", "segment", "run_task"}
    for tool in tools:
        assert {"task", "image_size", "bboxes", "labels", "scores"} <= set(tool.output_schema["properties"])

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint)
    prompts = ["<CAPTION>", "<OCR_WITH_REGION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a cup",
               "<REGION_TO_SEGMENTATION><loc_100><loc_100><loc_600><loc_700>", "<DENSE_REGION_CAPTION>"]
    size = list(Image.open(io.BytesIO(data)).size)
    for prompt, result in zip(prompts, results):
        assert not result.is_error, result.content
        task = prompt[:prompt.index(">") + 1]
        answer = library_answer(processor, model, data, prompt, task, max_new_tokens=MAX_NEW_TOKENS, num_beams=3)
        fields = {"text": answer} if isinstance(answer, str) else answer
        structured = {key: value for key, value in result.structured_content.items() if value is not None}
        assert structured == {"task": task, "image_size": size, **fields}
        assert json.loads(result.content[0].text) == result.structured_content
    drawn = results[3].content[1]
    assert drawn.type == "image" and drawn.mime_type == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(drawn.data))).size[0] >= size[0]
    for result, words in zip(results[6:], ("task token", "no image file", "not an image"), strict=True):
        assert result.is_error and words in result.content[0].text


def test_a_cancelled_tool_call_takes_its_request_out_of_the_queue_without_cancelling_its_future():
    import concurrent.futures
    import types

    from florence2_rs.serve.app import ServerOptions
    from florence2_rs.serve.mcp_server import Florence2Tools

    class QueueOnly:
        """An engine whose requests stay queued; records what is taken out of its queue."""

        def __init__(self):
            self.job = None
            self.cancelled = []

        def submit(self, image, prompts, settings):
            self.job = types.SimpleNamespace(future=concurrent.futures.Future())
            return self.job

        def cancel(self, job):
            self.cancelled.append(job)
            return True

    engine = QueueOnly()
    tools = Florence2Tools(engine, ServerOptions(model="unused"), allow_paths=False)
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")

    async def call_then_cancel():
        call = asyncio.ensure_future(tools.run(base64.b64encode(out.getvalue()).decode(), "<OD>", False))
        while engine.job is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)  # the call now awaits the job's future
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        return call

    call = asyncio.run(call_then_cancel())
    assert call.cancelled()
    assert engine.cancelled == [engine.job]
    assert not engine.job.future.cancelled()  # the engine's future belongs to its worker
