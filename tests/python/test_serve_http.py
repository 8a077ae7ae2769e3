"""florence2-serve as a subprocess on a free port, with real clients (httpx, the openai client, raw sockets):
parity with the library, batching, admission limits, faults, and the drain on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_support import ServerProcess, b64, data_url, library_answer, sample_images  # noqa: E402

from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration, pipeline  # noqa: E402

MAX_NEW_TOKENS = 8
NUM_BEAMS = 3  # the server's default, as Microsoft's examples
MAX_QUEUE = 4
MAX_BODY_MB = 1
GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return sample_images()


@pytest.fixture(scope="module")
def library(end_to_end_checkpoint, tmp_path_factory):
    """The library itself, per layout: (processor, model, the settings the servers' wrapper adds), to compute
    the expected answers. The wrapper suppresses every token but the location tokens, two words and the end
    token, so that the random-weight model answers with boxes (and so with box scores)."""
    folder = tmp_path_factory.mktemp("suppress")
    found = {}
    for layout in ("hf", "original"):
        processor = AutoProcessor.from_pretrained(end_to_end_checkpoint / layout)
        model = Florence2ForConditionalGeneration.from_pretrained(end_to_end_checkpoint / layout)
        keep = set(processor.tokenizer.convert_tokens_to_ids([f"<loc_{b}>" for b in range(1000)]))
        keep |= {processor.tokenizer.eos_token_id, *processor.tokenizer.encode("cat dog", add_special_tokens=False)}
        suppress = [i for i in range(model.config.text_config.vocab_size) if i not in keep]
        (folder / layout).write_text(json.dumps(suppress))
        found[layout] = (processor, model, {"suppress_tokens": suppress, "file": str(folder / layout)})
    return found


def _expected(library, layout: str, data: bytes, prompt: str, task: str, **settings):
    processor, model, added = library[layout]
    return library_answer(processor, model, data, prompt, task, suppress_tokens=added["suppress_tokens"], **settings)


def _fail_prompt_ids(library) -> tuple[str, str, str]:
    """Two grounding phrases whose prompts have the same length (so they share a batch), and the ids of the
    second one's prompt, for the wrapper's injected error."""
    processor = library["hf"][0]
    image = Image.new("RGB", (32, 32))
    lengths = {}
    for phrase in ("a cat", "a dog", "a car", "a man", "a hat"):
        ids = processor(text=GROUNDING + phrase, images=image, return_tensors="np")["input_ids"][0]
        lengths.setdefault(len(ids), []).append((phrase, ids))
    same = next(group for group in lengths.values() if len(group) >= 2)
    return same[0][0], same[1][0], ",".join(str(int(i)) for i in same[1][1])


@pytest.fixture(scope="module")
def hold(tmp_path_factory) -> Path:
    """While this file exists, the servers' generate waits (see serve_wrapper.py)."""
    return tmp_path_factory.mktemp("serve") / "hold"


def _start(checkpoint: Path, hold: Path, extra: list[str] = (), env: dict[str, str] | None = None) -> ServerProcess:
    args = ["--model", str(checkpoint), "--threads", "1", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--max-batch-size", "4", "--max-wait-ms", "20", "--max-queue", str(MAX_QUEUE),
            "--max-body-mb", str(MAX_BODY_MB), "--max-image-pixels", "16000000", *extra]
    return ServerProcess(args, env={"SERVE_TEST_HOLD_FILE": str(hold), **(env or {})})


@pytest.fixture(scope="module")
def servers(end_to_end_checkpoint, library, hold):
    """One server per checkpoint layout, for the whole module; the hf one also fails the row whose prompt is
    the second phrase of `_fail_prompt_ids` and fetches URLs of public addresses only, the original one fetches
    URLs of any address."""
    _, _, fail_ids = _fail_prompt_ids(library)
    started = {}
    try:
        started["hf"] = _start(end_to_end_checkpoint / "hf", hold, ["--allow-url-fetch"],
                               {"SERVE_TEST_FAIL_IDS": fail_ids, "SERVE_TEST_SUPPRESS_FILE": library["hf"][2]["file"]})
        started["original"] = _start(end_to_end_checkpoint / "original", hold,
                                     ["--allow-url-fetch", "--allow-private-urls", "--max-url-mb", "1"],
                                     env={"SERVE_TEST_SUPPRESS_FILE": library["original"][2]["file"]})
        yield started
    finally:
        hold.unlink(missing_ok=True)
        for server in started.values():
            assert server.terminate() == 0, "".join(server.stderr)[-3000:]


@pytest.fixture
def held(hold):
    """Holds generate for the test's body; released at the end even if the test fails."""
    hold.touch()
    yield hold
    hold.unlink(missing_ok=True)


def _native(server: ServerProcess, data: bytes, tasks: list[str], **fields) -> httpx.Response:
    return httpx.post(server.url + "/v1/florence2", json={"image": b64(data), "tasks": tasks, **fields}, timeout=120)


def _in_threads(calls) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def _occupy_worker(server: ServerProcess, pool: concurrent.futures.Executor, data: bytes) -> concurrent.futures.Future:
    """Sends one request and waits until the (held) worker is running it, so that the next ones queue."""
    running = server.metric("florence2_requests_running")
    first = pool.submit(_native, server, data, ["<OD>"])
    server.wait_metric("florence2_requests_running", running + 1)
    return first


# -- parity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_native_answers_equal_the_library_batched_and_alone(servers, library, images, held, layout):
    server = servers[layout]
    names = ["coffee", "chelsea", "rocket"]
    batches_before = server.metric("florence2_batch_size_count")
    images_before = server.metric("florence2_images_total")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = _occupy_worker(server, pool, images["astronaut"])
        queued = [pool.submit(_native, server, images[name], ["<OD>", "<OCR_WITH_REGION>"]) for name in names]
        server.wait_metric("florence2_requests_waiting", len(names))
        held.unlink()
        responses = [first.result()] + [f.result() for f in queued]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # The first ran alone. The six rows queued behind it (three images x two tasks whose prompts are as long)
    # share generate calls of at most four rows, in the order they arrived (two images in the first call, one in
    # the second); each image goes through the vision tower once.
    assert responses[0].json()["timings"]["batch_size"] == {"<OD>": 1}
    sizes = sorted(tuple(r.json()["timings"]["batch_size"].items()) for r in responses[1:])
    assert sizes == [(("<OD>", 2), ("<OCR_WITH_REGION>", 2))] + [(("<OD>", 4), ("<OCR_WITH_REGION>", 4))] * 2
    assert server.metric("florence2_batch_size_count") == batches_before + 3
    assert server.metric("florence2_images_total") == images_before + 4
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, num_beams=NUM_BEAMS)
    scored = 0
    for name, response in zip(["astronaut"] + names, responses):
        body = response.json()
        for task, answer in body["results"].items():
            assert answer == _expected(library, layout, images[name], task, task, **settings), (name, task)
            scored += len(answer.get("scores", []))
        assert body["image_size"] == list(Image.open(io.BytesIO(images[name])).size)
    assert scored > 0  # the answers hold boxes, so the per-box scores are compared too


def test_native_settings_text_and_multipart_upload(servers, library, images):
    server = servers["hf"]
    data = images["chelsea"]
    response = _native(server, data, ["caption_to_phrase_grounding"], text="a cat", num_beams=1, max_new_tokens=5)
    assert response.status_code == 200, response.text
    expected = _expected(library, "hf", data, GROUNDING + "a cat", GROUNDING, num_beams=1, max_new_tokens=5)
    assert response.json()["results"] == {GROUNDING: expected}
    upload = httpx.post(server.url + "/v1/florence2", files={"image": ("cat.png", data, "image/png")},
                        data={"tasks": ["OD"], "num_beams": "2"}, timeout=120)
    assert upload.status_code == 200, upload.text
    expected = _expected(library, "hf", data, "<OD>", "<OD>", num_beams=2, max_new_tokens=MAX_NEW_TOKENS)
    assert upload.json()["results"] == {"<OD>": expected}


def _chat_messages(data: bytes, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                         {"type": "text", "text": prompt}]}]


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_openai_client_chat_completions_equal_the_pipeline(servers, library, images, end_to_end_checkpoint, layout):
    server = servers[layout]
    processor, model, added = library[layout]
    suppress = added["suppress_tokens"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    assert name == str(end_to_end_checkpoint / layout)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    data = images["coffee"]
    image = Image.open(io.BytesIO(data)).convert("RGB")
    for prompt, task in (("<OD>", "<OD>"), ("<CAPTION>", "<CAPTION>"), (GROUNDING + "a cup", GROUNDING)):
        completion = client.chat.completions.create(model=name, messages=_chat_messages(data, prompt),
                                                    max_tokens=MAX_NEW_TOKENS)
        message = completion.choices[0].message
        expected_text = pipe(image, text=prompt, return_full_text=False, max_new_tokens=MAX_NEW_TOKENS,
                             num_beams=NUM_BEAMS, suppress_tokens=suppress)[0]["generated_text"]
        assert message.content == expected_text
        expected = _expected(library, layout, data, prompt, task, max_new_tokens=MAX_NEW_TOKENS, num_beams=NUM_BEAMS)
        assert message.model_extra["florence2_result"] == expected
        assert completion.choices[0].finish_reason in ("stop", "length")

        stream = client.chat.completions.create(model=name, messages=_chat_messages(data, prompt),
                                                max_tokens=MAX_NEW_TOKENS, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text
        assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason

    # Seeded sampling is the library's for that request alone.
    sampled = [client.chat.completions.create(model=name, messages=_chat_messages(data, "<CAPTION>"),
                                              max_tokens=MAX_NEW_TOKENS, temperature=0.9, seed=7)
               for _ in range(2)]
    expected = pipe(image, text="<CAPTION>", return_full_text=False, max_new_tokens=MAX_NEW_TOKENS, num_beams=1,
                    do_sample=True, temperature=0.9, seed=7, suppress_tokens=suppress)[0]["generated_text"]
    assert [s.choices[0].message.content for s in sampled] == [expected, expected]


def test_openai_errors(servers, images):
    client = openai.OpenAI(base_url=servers["hf"].url + "/v1", api_key="unused", max_retries=0)
    data = images["coffee"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=_chat_messages(data, "<OD>"))
    cases = [dict(messages=_chat_messages(data, "describe this")), dict(messages=_chat_messages(data, "<OD>"), n=2),
             dict(messages=_chat_messages(data, "<OD>"), seed=3),
             dict(messages=_chat_messages(data, "<OD>"), tools=[{"type": "function", "function": {"name": "f"}}]),
             dict(messages=[{"role": "user", "content": "<OD>"}])]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=client.models.list().data[0].id, **case)
        assert err.value.body["message"] and err.value.body["code"]


# -- admission and faults ----------------------------------------------------------------------------------------


def test_burst_beyond_the_queue_gets_exactly_the_excess_429_then_recovers(servers, images, held):
    server = servers["hf"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    data = images["rocket"]
    excess = 3

    def chat():
        try:
            return client.chat.completions.create(model=client.models.list().data[0].id,
                                                  messages=_chat_messages(data, "<CAPTION>"))
        except openai.RateLimitError as err:
            return err

    rejected_before = server.metric("florence2_rejections_total", reason="queue_full")
    with concurrent.futures.ThreadPoolExecutor(MAX_QUEUE + excess + 1) as pool:
        first = _occupy_worker(server, pool, data)
        burst = [pool.submit(chat) for _ in range(MAX_QUEUE + excess)]
        server.wait_metric("florence2_rejections_total", rejected_before + excess, reason="queue_full")
        assert server.metric("florence2_requests_waiting") == MAX_QUEUE
        held.unlink()
        results = [f.result() for f in burst]
        assert first.result().status_code == 200
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(limited) == excess
    assert all(e.response.headers["retry-after"] == "1" and e.body["code"] == "queue_full" for e in limited)
    assert all(r.choices[0].message.content is not None for r in results if r not in limited)
    assert _native(server, data, ["<CAPTION>"]).status_code == 200


def _connect(server: ServerProcess) -> socket.socket:
    address = urllib.parse.urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=60)


def _raw(server: ServerProcess, request: bytes, shutdown: bool = False) -> bytes:
    """Sends raw bytes on a new connection and returns what comes back until the server closes it."""
    with _connect(server) as sock:
        sock.sendall(request)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_oversized_and_truncated_bodies(servers):
    server = servers["hf"]
    limit = MAX_BODY_MB * 2**20
    head = b"POST /v1/florence2 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # A huge declared length is refused before a byte of the body is read.
    answer = _raw(server, head + f"Content-Length: {10**12}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"
    # A chunked body is counted as it streams in: refused once past the limit, and the connection closed even
    # where the rest of the body arrives after the answer (kept alive, it would sit open and idle for good).
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    with _connect(server) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * (limit // 65536 + 1))
        answer = b""
        while b"body_too_large" not in answer and (received := sock.recv(65536)):
            answer += received
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"connection: close" in answer.lower(), answer[:300]
        try:
            sock.sendall(chunk * 4 + b"0\r\n\r\n")
            sock.settimeout(20)
            while sock.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed: what the test wants
    # A body cut short (the client closes its side early) gets no answer and leaves the server healthy.
    _raw(server, head + b'Content-Length: 1000\r\n\r\n{"image": "abc', shutdown=True)
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.metric("florence2_rejections_total", reason="body_too_large") >= 2


def test_bad_images_and_requests(servers, images, tmp_path):
    server = servers["hf"]
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # 64 Mpixels in a few kilobytes
    assert len(bomb.getvalue()) < 100_000
    truncated = images["coffee"][: len(images["coffee"]) // 2]
    cases = [
        ({"image": b64(bomb.getvalue()), "tasks": ["<OD>"]}, 413, "image_too_large"),
        ({"image": b64(b"GIF89a not really"), "tasks": ["<OD>"]}, 400, "invalid_image"),
        ({"image": b64(truncated), "tasks": ["<OD>"]}, 400, "invalid_image"),
        ({"image": "***not base64***", "tasks": ["<OD>"]}, 400, "invalid_image"),
        ({"image": b64(images["coffee"]), "tasks": ["<SEGMENT_EVERYTHING>"]}, 400, "unknown_task"),
        ({"image": b64(images["coffee"]), "tasks": [GROUNDING]}, 400, "missing_text"),
        ({"image": b64(images["coffee"]), "tasks": ["<OD>"], "text": "a cat"}, 400, "unexpected_text"),
        ({"image": b64(images["coffee"]), "tasks": ["<OD>"], "num_beams": 0}, 400, "invalid_request"),
        ({"image": b64(images["coffee"]), "tasks": ["<OD>"], "max_length": 9}, 400, "invalid_request"),
        ({"image": "http://127.0.0.1:1/cat.png", "tasks": ["<OD>"]}, 400, "image_url_forbidden"),
        ({"image": b64(images["coffee"]), "tasks": [GROUNDING], "text": "a cat " * 300}, 400, "prompt_too_long"),
    ]
    for body, status, code in cases:
        response = httpx.post(server.url + "/v1/florence2", json=body, timeout=60)
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"]["code"] == code
    assert httpx.post(server.url + "/v1/florence2", content=b"{not json", timeout=60).status_code == 400
    assert httpx.get(server.url + "/health").status_code == 200


def test_image_urls_are_fetched_within_limits(servers, library, images):
    server = servers["original"]
    pictures = {"/cat.png": images["chelsea"], "/big.png": b"\0" * (2 * 2**20)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            body = pictures.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        fetched = httpx.post(server.url + "/v1/florence2", json={"image": base + "/cat.png", "tasks": ["<OD>"]},
                             timeout=60)
        assert fetched.status_code == 200, fetched.text
        expected = _expected(library, "original", images["chelsea"], "<OD>", "<OD>", max_new_tokens=MAX_NEW_TOKENS,
                             num_beams=NUM_BEAMS)
        assert fetched.json()["results"] == {"<OD>": expected}
        for path, status, code in (("/big.png", 413, "image_too_large"), ("/moved.png", 400, "image_url_fetch_failed"),
                                   ("/gone.png", 400, "image_url_fetch_failed")):
            response = httpx.post(server.url + "/v1/florence2", json={"image": base + path, "tasks": ["<OD>"]},
                                  timeout=60)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), path
    finally:
        files.shutdown()


def test_a_client_that_leaves_while_queued_is_never_run(servers, images, held):
    server = servers["hf"]
    data = images["chelsea"]
    rows_before = server.metric("florence2_batch_size_sum")
    gone_before = server.metric("florence2_rejections_total", reason="disconnected")
    body = json.dumps({"image": b64(data), "tasks": ["<OCR_WITH_REGION>"]}).encode()
    address = urllib.parse.urlsplit(server.url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = _occupy_worker(server, pool, data)
        sock = socket.create_connection((address.hostname, address.port))
        sock.sendall(b"POST /v1/florence2 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        server.wait_metric("florence2_requests_waiting", 1)
        sock.close()
        server.wait_metric("florence2_rejections_total", gone_before + 1, reason="disconnected")
        assert server.metric("florence2_requests_waiting") == 0
        held.unlink()
        assert first.result().status_code == 200
    assert server.metric("florence2_batch_size_sum") == rows_before + 1  # the first request's row alone


def test_a_model_error_in_one_row_fails_that_request_alone(servers, library, images, held):
    server = servers["hf"]
    good, bad, _ = _fail_prompt_ids(library)
    retries_before = server.metric("florence2_batch_retries_total")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = _occupy_worker(server, pool, images["coffee"])
        phrases = [good, bad, good]
        queued = [pool.submit(_native, server, images[name], [GROUNDING], text=phrase)
                  for name, phrase in zip(["coffee", "chelsea", "rocket"], phrases)]
        server.wait_metric("florence2_requests_waiting", 3)
        held.unlink()
        responses = [f.result() for f in queued]
        assert first.result().status_code == 200
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert "injected model error" in responses[1].json()["error"]["message"]
    assert server.metric("florence2_batch_retries_total") == retries_before + 1
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_count_only_the_expected_server_errors(servers):
    # Runs after the fault tests: the injected error is the one 5xx the hf server has answered.
    server = servers["hf"]
    text = httpx.get(server.url + "/metrics").text
    fives = [line for line in text.splitlines()
             if line.startswith("florence2_requests_total") and 'status="5' in line and not line.endswith(" 0.0")]
    assert len(fives) == 1 and 'status="500"' in fives[0] and fives[0].endswith(" 1.0"), fives


# -- timeout and drain (a server of their own, stopped by the test) -----------------------------------------------


def test_timeout_then_sigterm_under_load_answers_admitted_requests(end_to_end_checkpoint, images, hold):
    server = _start(end_to_end_checkpoint / "hf", hold, ["--request-timeout-s", "2", "--shutdown-timeout-s", "30"])
    try:
        data = images["astronaut"]
        hold.touch()
        started = time.monotonic()
        late = _native(server, data, ["<OD>"])
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert 1.5 < time.monotonic() - started < 30
        hold.unlink()
        server.wait_metric("florence2_requests_running", 0)

        # Longer timeouts for the drain: a server whose admitted requests are held, then SIGTERM.
        server.terminate()
        server = _start(end_to_end_checkpoint / "hf", hold, ["--shutdown-timeout-s", "30"])
        hold.touch()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = _occupy_worker(server, pool, data)
            queued = [pool.submit(_native, server, data, ["<CAPTION>"]) for _ in range(2)]
            server.wait_metric("florence2_requests_waiting", 2)
            server.proc.send_signal(15)
            deadline = time.monotonic() + 10
            while httpx.get(server.url + "/health").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = _native(server, data, ["<OD>"])
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            hold.unlink()
            answered = [first.result()] + [f.result() for f in queued]
        assert [r.status_code for r in answered] == [200, 200, 200]
        assert server.proc.wait(timeout=30) == 0
    finally:
        hold.unlink(missing_ok=True)
        server.kill()


def test_the_core_package_does_not_import_the_server_stack():
    code = ("import sys, florence2_rs\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'pydantic', 'mcp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_model_that_cannot_load_exits_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "florence2_rs.serve", "--model", str(tmp_path / "missing"),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "florence2-serve: listening on" in proc.stdout
    assert f"cannot load {tmp_path / 'missing'}" in proc.stderr


@pytest.mark.parametrize("option", [["--max-queue", "0"], ["--max-body-mb", "-1"], ["--max-wait-ms", "nan"],
                                    ["--threads", "0"]])
def test_settings_that_cannot_work_are_usage_errors(option):
    proc = subprocess.run([sys.executable, "-m", "florence2_rs.serve", "--model", "unused", *option],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and option[0] in proc.stderr, proc.stderr


# -- in-process units: the engine's futures, shutdown, URL fetching, the pixel limit ------------------------------


@pytest.fixture(scope="module")
def engine_parts(end_to_end_checkpoint):
    """The hf layout's model and processor, with a generate that waits while `gate` is clear."""
    processor = AutoProcessor.from_pretrained(end_to_end_checkpoint / "hf")
    model = Florence2ForConditionalGeneration.from_pretrained(end_to_end_checkpoint / "hf")
    gate = threading.Event()
    generate = model.generate

    def gated(*args, **kwargs):
        assert gate.wait(60)
        return generate(*args, **kwargs)

    model.generate = gated
    return model, processor, gate


def test_cancelled_futures_leave_the_other_rows_and_the_counts_intact(engine_parts, images):
    from florence2_rs.serve.engine import Engine, EngineOptions
    from florence2_rs.serve.schemas import TaskPrompt

    model, processor, gate = engine_parts
    gate.clear()
    engine = Engine(model, processor, EngineOptions(max_batch_size=4, max_wait_ms=1, generation={
        "max_new_tokens": 4, "num_beams": 1, "do_sample": False}))
    gauge = engine.metrics.registry.get_sample_value
    try:
        image = Image.open(io.BytesIO(images["chelsea"])).convert("RGB")
        od = [TaskPrompt("<OD>", "<OD>")]
        running = engine.submit(image, od, {})
        deadline = time.monotonic() + 30
        while gauge("florence2_requests_running") != 1:  # the worker holds its batch in generate
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = [engine.submit(image, od, {}) for _ in range(3)]
        assert not running.future.cancel()  # started: its caller can no longer cancel it
        assert queued[1].future.cancel()  # as asyncio.wrap_future does for a cancelled caller
        gate.set()
        assert running.future.result(60).tasks["<OD>"].tokens > 0
        for job in (queued[0], queued[2]):
            assert job.future.result(60).tasks["<OD>"].batch_size == 2  # the cancelled row never ran
        deadline = time.monotonic() + 10
        while not engine.idle():
            assert time.monotonic() < deadline, "a cancelled job is still counted"
            time.sleep(0.01)
        assert gauge("florence2_requests_running") == 0 and gauge("florence2_requests_waiting") == 0
    finally:
        gate.set()
        engine.close()


def test_close_waits_at_most_the_shutdown_timeout():
    from florence2_rs.serve.app import ServerOptions, ServerState

    release = threading.Event()
    state = ServerState(ServerOptions(model="unused", shutdown_timeout_s=0.3), loader=lambda *_: release.wait(60))
    state.start_loading()
    state.start_draining()
    start = time.monotonic()
    try:
        state.close()
        assert time.monotonic() - start < 2
    finally:
        release.set()


@pytest.mark.parametrize("address, public", [
    ("93.184.215.14", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("::ffff:127.0.0.1", False), ("::127.0.0.1", False), ("64:ff9b::7f00:1", False), ("64:ff9b::5db8:d70e", True),
    ("2002:7f00:1::", False), ("2002:0a00:1::", False), ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False)])
def test_addresses_carrying_a_private_ipv4_are_not_public(address, public):
    import ipaddress

    from florence2_rs.serve.images import is_public_address

    assert is_public_address(ipaddress.ip_address(address)) is public


def _local_files(handler_get) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            handler_get(self)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    return files


def test_a_fetch_connects_to_the_checked_address_and_no_proxy(monkeypatch):
    from florence2_rs.serve import images as serve_images

    hosts = []

    def get(handler):
        hosts.append(handler.headers["Host"])
        handler.send_response(200)
        handler.send_header("Content-Length", "5")
        handler.end_headers()
        handler.wfile.write(b"image")

    files = _local_files(get)
    port = files.server_address[1]
    real = socket.getaddrinfo
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]])

    def rebinding(host, *args, **kwargs):  # the first answer is the checked one; a second lookup fails
        if host == "pinned.invalid":
            try:
                return next(answers)
            except StopIteration:
                raise socket.gaierror("a second lookup of the host") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    limits = serve_images.ImageLimits(allow_url_fetch=True, allow_private_urls=True, fetch_timeout_s=10)
    try:
        assert serve_images.fetch_url(f"http://pinned.invalid:{port}/x.png", limits) == b"image"
        assert hosts == [f"pinned.invalid:{port}"]
    finally:
        files.shutdown()


def test_a_slow_drip_url_ends_at_the_fetch_timeout():
    from florence2_rs.serve.images import ImageLimits, fetch_url
    from florence2_rs.serve.schemas import RequestError

    def get(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(40):  # a byte every 0.1 s: each read succeeds well within a per-read timeout
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    files = _local_files(get)
    limits = ImageLimits(allow_url_fetch=True, allow_private_urls=True, fetch_timeout_s=1)
    start = time.monotonic()
    try:
        with pytest.raises(RequestError, match="fetch timeout") as caught:
            fetch_url(f"http://127.0.0.1:{files.server_address[1]}/slow.png", limits)
        assert caught.value.status == 400 and time.monotonic() - start < 2.5
    finally:
        files.shutdown()


def test_an_image_inside_an_icon_is_held_to_the_pixel_limit(monkeypatch):
    import struct

    from florence2_rs.serve.images import ImageLimits, decode_image, limit_decoder
    from florence2_rs.serve.schemas import RequestError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    out = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(out, format="PNG")
    inner = out.getvalue()
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner
    limits = ImageLimits(max_pixels=1_000_000)
    limit_decoder(limits)
    with pytest.raises(RequestError) as caught:
        decode_image(icon, limits)
    assert caught.value.status == 413
