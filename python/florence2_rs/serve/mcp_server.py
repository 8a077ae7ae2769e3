"""The `florence2-mcp` command: Florence-2 as tools of an MCP server (the official `mcp` SDK, version 2).

    florence2-mcp --model ID_OR_DIR [--transport stdio|streamable-http] [--host H] [--port P] [model options]

Tools: `caption`, `ocr` (with or without regions), `detect` (objects, or the phrases of a caption: phrase
grounding), `segment` (a referring expression or a region) and `run_task` (any Florence-2 task). Each takes
`image` (a file path on the server's machine with the stdio transport, base64, a `data:` URL, or an http(s)
URL with --allow-url-fetch) and returns a structured result (text, boxes, labels, scores; its output schema
is `TaskResult`), and with `draw=true` the picture with the result drawn on it. The model loads once, before
the server answers; requests share the HTTP server's batching engine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional, Sequence

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent
from pydantic import BaseModel

from ..apps.cli import usable_threads
from .app import ServerOptions, load_engine
from .cli import add_model_arguments, options_from_args
from .engine import Engine
from .images import decode_image, image_bytes, limit_decoder
from .metrics import ServeMetrics
from .schemas import RequestError, split_prompt


class TaskResult(BaseModel):
    """One task's answer: `text` for tasks that answer with text, else boxes / polygons with their labels,
    and a score in [0, 1] beside each box (the geometric mean of its location tokens' probabilities: it ranks
    boxes, it is not a calibrated detection score)."""

    task: str
    image_size: List[int]
    text: Optional[str] = None
    bboxes: Optional[List[List[float]]] = None
    quad_boxes: Optional[List[List[float]]] = None
    polygons: Optional[List[List[List[float]]]] = None
    labels: Optional[List[str]] = None
    bboxes_labels: Optional[List[str]] = None
    polygons_labels: Optional[List[str]] = None
    scores: Optional[List[Optional[float]]] = None


Result = Annotated[CallToolResult, TaskResult]


class Florence2Tools:
    """The tools over one engine.

    Args:
        engine: the loaded engine.
        options: the server options (image limits).
        allow_paths: whether `image` may name a file on this machine (the stdio transport: the client is the
            local user).
    """

    def __init__(self, engine: Engine, options: ServerOptions, allow_paths: bool) -> None:
        self.engine, self.options, self.allow_paths = engine, options, allow_paths
        limit_decoder(options.images)

    async def run(self, image: str, prompt: str, draw: bool) -> CallToolResult:
        """Runs one task prompt on one image: the structured result, and the drawn picture when asked.

        Raises:
            ToolError: a request the server refuses (its message reaches the client).
        """
        try:
            task = split_prompt(prompt)
            picture = await asyncio.to_thread(self._image, image)
            job = await asyncio.to_thread(self.engine.submit, picture, [task], {})
        except RequestError as err:
            raise ToolError(str(err)) from None
        # Shielded: a cancelled tool call must not cancel the engine's future (the worker owns it once it
        # runs); the request is taken out of the queue instead, when it has not started.
        try:
            answer = (await asyncio.shield(asyncio.wrap_future(job.future))).tasks[task.task].result
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise
        fields = {"text": answer} if isinstance(answer, str) else answer
        structured = TaskResult(task=task.task, image_size=list(picture.size), **fields).model_dump(mode="json")
        content: List[Any] = [TextContent(type="text", text=json.dumps(structured))]
        if draw:
            content.append(ImageContent(type="image", data=_png_base64(picture, {task.task: answer}),
                                        mime_type="image/png"))
        return CallToolResult(content=content, structured_content=structured)

    def _image(self, source: str) -> Any:
        """The image `source` names: a regular file (when paths are allowed), else base64, a data: URL or a URL."""
        limits = self.options.images
        if self.allow_paths and not source.startswith(("data:", "http://", "https://")) and _is_file(source):
            return decode_image(Path(source).expanduser().read_bytes(), limits)
        try:
            data = image_bytes(source, limits)
        except RequestError as err:
            if self.allow_paths and err.code == "invalid_image":
                raise RequestError(f"no image file at {source[:300]!r}, and it is not base64 or a data: URL "
                                   "either", code="invalid_image") from None
            raise
        return decode_image(data, limits)


def _is_file(source: str) -> bool:
    """Whether `source` names a regular file (not a FIFO or a device, whose reads could block)."""
    try:
        return len(source) < 4096 and Path(source).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _png_base64(image: Any, result: dict) -> str:
    import base64

    from ..apps.draw import draw

    out = io.BytesIO()
    draw(image, result).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def build_server(tools: Florence2Tools, name: str = "florence2") -> MCPServer:
    """The MCP server with the Florence-2 tools registered."""
    server = MCPServer(name, instructions="Florence-2 vision tools: captions, OCR, detection, phrase grounding "
                                          "and segmentation of one image per call.")

    @server.tool()
    async def caption(image: str, detail: Literal["brief", "detailed", "more_detailed"] = "brief",
                      draw: bool = False) -> Result:
        """Describes an image. `image`: a file path, base64, a data: URL or an allowed http(s) URL."""
        prompt = {"brief": "<CAPTION>", "detailed": "<DETAILED_CAPTION>",
                  "more_detailed": "<MORE_DETAILED_CAPTION>"}[detail]
        return await tools.run(image, prompt, draw)

    @server.tool()
    async def ocr(image: str, with_regions: bool = False, draw: bool = False) -> Result:
        """Reads the text in an image; with_regions gives each line's quadrilateral box."""
        return await tools.run(image, "<OCR_WITH_REGION>" if with_regions else "<OCR>", draw)

    @server.tool()
    async def detect(image: str, phrases: Optional[str] = None, draw: bool = False) -> Result:
        """Detects objects (boxes with labels and scores); with `phrases` (a caption), finds the regions of the
        phrases in it (phrase grounding)."""
        prompt = f"<CAPTION_TO_PHRASE_GROUNDING>{phrases}" if phrases else "<OD>"
        return await tools.run(image, prompt, draw)

    @server.tool()
    async def segment(image: str, expression: Optional[str] = None, region: Optional[List[int]] = None,
                      draw: bool = False) -> Result:
        """Segments what a referring expression names, or the object in a region given as four numbers
        x1, y1, x2, y2 in 0..999 (Florence-2's location bins); returns polygons."""
        if (expression is None) == (region is None):
            raise ToolError("give exactly one of expression or region")
        if region is not None:
            if len(region) != 4 or not all(0 <= v <= 999 for v in region):
                raise ToolError("region must be four integers from 0 to 999: x1, y1, x2, y2")
            return await tools.run(image, "<REGION_TO_SEGMENTATION>" + "".join(f"<loc_{v}>" for v in region), draw)
        return await tools.run(image, f"<REFERRING_EXPRESSION_SEGMENTATION>{expression}", draw)

    @server.tool()
    async def run_task(image: str, task: str, text: Optional[str] = None, draw: bool = False) -> Result:
        """Runs any Florence-2 task token (such as <DENSE_REGION_CAPTION> or <OPEN_VOCABULARY_DETECTION>), with
        `text` as its input where the task takes one."""
        return await tools.run(image, task + (text or ""), draw)

    return server


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Loads the model, then serves the tools until the client closes the connection."""
    p = argparse.ArgumentParser(prog="florence2-mcp", description="Serve Florence-2 as MCP tools.")
    add_model_arguments(p)
    p.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio",
                   help="stdio (a local client starts this command) or streamable HTTP (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="with streamable-http (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="with streamable-http (default: %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(usable_threads(args.threads, sys.stderr))
    options = options_from_args(args)
    try:
        engine = load_engine(options, ServeMetrics())
    except Exception as err:  # noqa: BLE001 - any failure to load is exit status 2 with its reason
        print(f"florence2-mcp: cannot load {options.model}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    stdio = args.transport == "stdio"
    server = build_server(Florence2Tools(engine, options, allow_paths=stdio))
    try:
        if stdio:
            server.run("stdio")
        else:
            server.run("streamable-http", host=args.host, port=args.port)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
