"""The FastAPI app: the native endpoint, OpenAI's chat completions and models, health and metrics, with the
admission rules (body size, loading and draining state, queue) in front of the batching engine.

Every refusal is OpenAI's error JSON (`{"error": {"message", "type", "code"}}`) with the status that says what
to do: 400 fix the request, 404 unknown model, 413 smaller body or image, 429 retry later (`Retry-After`),
503 retry elsewhere (loading or draining), 504 the answer took longer than the request timeout, 500 the model
failed on this request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from .engine import Answer, Engine, EngineOptions
from .images import ImageLimits, decode_image, image_bytes, limit_decoder
from .metrics import ServeMetrics
from .schemas import ChatRequest, NativeRequest, RequestError, TaskPrompt, chat_inputs, task_prompts


@dataclass
class ServerOptions:
    """What the server loads and the limits it applies.

    Attributes:
        model: Hub id or checkpoint folder.
        served_model_name: the name `/v1/models` lists and chat requests may give (default: `model`).
        dtype: "auto", "float32", "float16" or "bfloat16".
        quantize: None, "int8" or "int4" (the linear layers' weights).
        device: "cpu", "cuda[:N]" or "auto".
        engine: the batching knobs and generation defaults.
        images: the image limits and URL fetching.
        max_body_bytes: the largest request body.
        request_timeout_s: the longest a request waits for its answer (504 after).
        shutdown_timeout_s: on SIGTERM, the longest the server waits for admitted requests.
    """

    model: str
    served_model_name: Optional[str] = None
    dtype: str = "auto"
    quantize: Optional[str] = None
    device: str = "cpu"
    engine: EngineOptions = field(default_factory=EngineOptions)
    images: ImageLimits = field(default_factory=ImageLimits)
    max_body_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float = 300.0
    shutdown_timeout_s: float = 30.0

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


def load_engine(options: ServerOptions, metrics: ServeMetrics) -> Engine:
    """Loads the model and processor once and starts the engine."""
    from ..modeling import Florence2ForConditionalGeneration
    from ..processing import AutoProcessor
    from ..quantization import config_for_mode

    processor = AutoProcessor.from_pretrained(options.model)
    model = Florence2ForConditionalGeneration.from_pretrained(options.model, dtype=options.dtype,
                                                              device=options.device,
                                                              quantization_config=config_for_mode(options.quantize))
    return Engine(model, processor, options.engine, metrics)


class ServerState:
    """The app's state: the engine once loaded, the load error, draining, and the requests being answered.

    Args:
        options: the server options.
        loader: builds the engine (`load_engine`), on a thread of its own so that `/health` answers 503 while
            the model loads.
    """

    def __init__(self, options: ServerOptions,
                 loader: Callable[[ServerOptions, ServeMetrics], Engine] = load_engine) -> None:
        self.options = options
        limit_decoder(options.images)
        self.metrics = ServeMetrics()
        self.engine: Optional[Engine] = None
        self.load_error: Optional[str] = None
        self.draining_since: Optional[float] = None
        self.inflight = 0
        self._loader = loader
        self._loading: Optional[threading.Thread] = None

    def start_loading(self) -> None:
        """Loads the engine on a thread of its own, unless it was given already (as Ray Serve replicas do)."""
        if self.engine is not None:
            return

        def load() -> None:
            try:
                self.engine = self._loader(self.options, self.metrics)
            except Exception as err:  # noqa: BLE001 - reported by /health and the command, which exits
                self.load_error = f"cannot load {self.options.model}: {type(err).__name__}: {err}"

        self._loading = threading.Thread(target=load, name="florence2-load", daemon=True)
        self._loading.start()

    def start_draining(self) -> None:
        """From now on `/health` and new requests answer 503; admitted requests are still answered."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def drained(self) -> bool:
        """Whether draining is over: nothing is being answered, or the shutdown timeout has passed."""
        if self.draining_since is None:
            return False
        return self.inflight == 0 or time.monotonic() - self.draining_since > self.options.shutdown_timeout_s

    def close(self) -> None:
        """Stops the engine, waiting for the loading thread and the current batch at most until the shutdown
        timeout (counted from the start of draining) has passed; both are daemon threads, left to the exit."""
        start = self.draining_since if self.draining_since is not None else time.monotonic()
        deadline = start + self.options.shutdown_timeout_s
        if self._loading is not None:
            self._loading.join(max(0.0, deadline - time.monotonic()))
        if self.engine is not None:
            self.engine.close(max(0.0, deadline - time.monotonic()))

    def admit(self) -> Engine:
        """The engine, for a request admitted now.

        Raises:
            RequestError: 503 while loading, after a failed load, or while draining.
        """
        if self.draining_since is not None:
            raise RequestError("the server is shutting down; retry on another replica", status=503,
                               code="draining", error_type="server_error", headers={"Retry-After": "1"})
        if self.engine is None:
            message = self.load_error or "the model is still loading; retry shortly"
            raise RequestError(message, status=503, code="loading", error_type="server_error",
                               headers={"Retry-After": "5"})
        return self.engine


# -- the request body ---------------------------------------------------------------------------------------


class BodyTooLarge(RequestError):
    """Answered with `Connection: close`: the rest of the body is never read, and a connection kept alive
    after it would take the unread bytes as body and then sit idle with no keep-alive timeout."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes ({limit / 2**20:g} MiB)", status=413,
                         code="body_too_large", headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` while they stream in: a declared Content-Length over the limit before
    any byte is read, a chunked body as soon as the bytes read pass it (the endpoint reading the body gets
    `BodyTooLarge`, answered 413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        seen = 0

        async def limited() -> Dict[str, Any]:
            nonlocal seen
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _read_json(request: Request, model: Any) -> Any:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise RequestError(_validation_message(err), code="invalid_request") from None


def _validation_message(err: ValidationError) -> str:
    parts = []
    for error in err.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "body"
        parts.append(f"{where}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


async def _read_form(request: Request) -> Tuple[Optional[bytes], NativeRequest]:
    """A multipart upload: the file (or base64 text) in `image`, `tasks` (repeated), `text`, and generation
    settings as fields whose values are JSON scalars (`max_new_tokens=20`)."""
    form = await request.form(max_part_size=request.app.state.server.options.max_body_bytes)
    upload = form.get("image")
    if isinstance(upload, UploadFile):
        data: Optional[bytes] = await upload.read()
        source = "upload"
    elif isinstance(upload, str) and upload:
        data, source = None, upload
    else:
        raise RequestError("the form needs an `image` field (a file, or base64 text)", code="missing_image")
    fields: Dict[str, Any] = {"image": source, "tasks": [t for t in form.getlist("tasks") if isinstance(t, str)]}
    for key, value in form.multi_items():
        if key in ("image", "tasks") or not isinstance(value, str):
            continue
        if key == "text":
            fields[key] = value
            continue
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    try:
        parsed = NativeRequest(**fields)
    except ValidationError as err:
        raise RequestError(_validation_message(err), code="invalid_request") from None
    return data, parsed


async def _load_image(data: Optional[bytes], source: str, limits: ImageLimits) -> Any:
    """The decoded image, from uploaded bytes or a request's image string; the work runs off the event loop."""
    if data is None:
        data = await run_in_threadpool(image_bytes, source, limits)
    return await run_in_threadpool(decode_image, data, limits)


async def _until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the server's receive gives http.disconnect once the
    body is read and the client goes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _answer(request: Request, engine: Engine, image: Any, prompts: List[TaskPrompt],
                  settings: Dict[str, Any]) -> Answer:
    """Queues a request and waits for its answer, its client leaving, or its timeout; a request that has not
    started when its client leaves or its time runs out is taken out of the queue and never runs."""
    state: ServerState = request.app.state.server
    job = await run_in_threadpool(engine.submit, image, prompts, settings)
    answer = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, timeout=state.options.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer in done:
        return answer.result()
    engine.cancel(job)
    answer.add_done_callback(_consume)  # the answer of a request that started and is no longer awaited
    if gone in done:
        raise ClientGone()
    raise RequestError(f"no answer within the request timeout ({state.options.request_timeout_s:g} s)",
                       status=504, code="timeout", error_type="server_error")


def _consume(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()


async def _serve(request: Request, endpoint: str,
                 handler: Callable[[Engine, List[str]], Awaitable[Response]]) -> Response:
    """Runs an endpoint's handler with the admission rules, error mapping and metrics every model endpoint
    shares. `handler` gets the engine and a list it fills with the request's tasks (for the metrics)."""
    state: ServerState = request.app.state.server
    metrics = state.metrics
    start = time.perf_counter()
    tasks: List[str] = []
    state.inflight += 1
    try:
        try:
            engine = state.admit()
            response = await handler(engine, tasks)
            status = response.status_code
        except RequestError as err:
            metrics.rejections.labels(reason=err.code).inc()
            response, status = _error_response(err), err.status
        except (ClientGone, ClientDisconnect):
            metrics.rejections.labels(reason="disconnected").inc()
            response, status = Response(status_code=499), 499
        except Exception as err:  # noqa: BLE001 - the model failed on this request; the server goes on
            error = RequestError(f"the model failed on this request: {type(err).__name__}: {err}", status=500,
                                 code="model_error", error_type="server_error")
            response, status = _error_response(error), 500
        for task in tasks or [""]:
            metrics.requests.labels(endpoint=endpoint, task=task, status=str(status)).inc()
        metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response
    finally:
        state.inflight -= 1


def _error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _timings(answer: Answer) -> Dict[str, Any]:
    return {"queue_s": round(answer.queue_s, 4), "image_s": round(answer.image_s, 4),
            "generate_s": {task: round(a.generate_s, 4) for task, a in answer.tasks.items()},
            "batch_size": {task: a.batch_size for task, a in answer.tasks.items()}}


# -- the app ------------------------------------------------------------------------------------------------


def create_app(options: ServerOptions,
               loader: Callable[[ServerOptions, ServeMetrics], Engine] = load_engine) -> FastAPI:
    """The FastAPI app serving one model. The model loads when the app starts (its lifespan), on a thread of
    its own; until then `/health` and the model endpoints answer 503.

    Args:
        options: the model and the limits.
        loader: builds the engine (tests and embedders may pass their own).

    Returns:
        The app, for uvicorn, Ray Serve or any ASGI server.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServerState = app.state.server
        state.start_loading()
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(title="florence2-serve", lifespan=lifespan)
    app.state.server = ServerState(options, loader)
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)

    @app.post("/v1/florence2")
    async def florence2(request: Request) -> Response:
        """One image, one or several tasks: each task's post-processed answer with box scores, and timings."""

        async def handle(engine: Engine, tasks: List[str]) -> Response:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                data, body = await _read_form(request)
            else:
                data, body = None, await _read_json(request, NativeRequest)
            prompts = task_prompts(body.tasks, body.text)
            tasks.extend(p.task for p in prompts)
            image = await _load_image(data, body.image, options.images)
            settings = body.given()
            answer = await _answer(request, engine, image, prompts, settings)
            return JSONResponse({"model": options.name, "image_size": list(image.size),
                                 "results": {task: a.result for task, a in answer.tasks.items()},
                                 "timings": _timings(answer)})

        return await _serve(request, "florence2", handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI's chat completions: the task prompt and one image in the last user message."""

        async def handle(engine: Engine, tasks: List[str]) -> Response:
            body = await _read_json(request, ChatRequest)
            if body.model not in (None, options.name):
                raise RequestError(f"the model {body.model!r} does not exist here; this server serves "
                                   f"{options.name!r}", status=404, code="model_not_found")
            url, prompt, settings = chat_inputs(body)
            tasks.append(prompt.task)
            image = await _load_image(None, url, options.images)
            answer = (await _answer(request, engine, image, [prompt], settings.given())).tasks[prompt.task]
            reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.name}
            message = {"role": "assistant", "content": answer.text, "florence2_result": answer.result}
            finish = "stop" if answer.stopped else "length"
            if body.stream:
                return StreamingResponse(_chat_stream(reply, message, finish), media_type="text/event-stream")
            usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.tokens,
                     "total_tokens": answer.prompt_tokens + answer.tokens}
            return JSONResponse({**reply, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "message": message, "finish_reason": finish}]})

        return await _serve(request, "chat_completions", handle)

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        """The one model this server serves."""
        return {"object": "list", "data": [{"id": options.name, "object": "model", "created": 0,
                                            "owned_by": "florence2-rs"}]}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 once the model is loaded; 503 while it loads, after a failed load, or while draining."""
        state: ServerState = request.app.state.server
        if state.draining_since is not None:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.load_error is not None:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": options.name, "pid": os.getpid()})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        payload, content_type = request.app.state.server.metrics.exposition()
        return Response(payload, media_type=content_type)

    return app


async def _chat_stream(reply: Dict[str, Any], message: Dict[str, Any], finish: str) -> AsyncIterator[bytes]:
    """The answer as server-sent events: one delta with the whole answer, the finish reason, then [DONE]."""
    chunk = {**reply, "object": "chat.completion.chunk"}
    for choice in ({"index": 0, "delta": message, "finish_reason": None},
                   {"index": 0, "delta": {}, "finish_reason": finish}):
        yield f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode()
    yield b"data: [DONE]\n\n"
