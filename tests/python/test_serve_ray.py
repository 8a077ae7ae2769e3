"""The server's app as a Ray Serve deployment with two replicas, in a local Ray, queried through Ray's HTTP
proxy with httpx and the openai client; answers equal the library's."""

from __future__ import annotations

import concurrent.futures
import socket

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from serve_support import b64, data_url, library_answer, sample_images  # noqa: E402

from florence2_rs import AutoProcessor, Florence2ForConditionalGeneration  # noqa: E402
from florence2_rs.serve import EngineOptions, ServerOptions  # noqa: E402
from florence2_rs.serve.engine import DEFAULT_GENERATION  # noqa: E402
from florence2_rs.serve.ray_serve import deployment  # noqa: E402

MAX_NEW_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def local_serve():
    """Ray on this machine with two CPUs, and Serve's proxy on a free port; both shut down afterwards."""
    ray.init(num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_the_library(end_to_end_checkpoint, local_serve):
    checkpoint = end_to_end_checkpoint / "original"
    options = ServerOptions(model=str(checkpoint), engine=EngineOptions(
        max_batch_size=4, generation={**DEFAULT_GENERATION, "max_new_tokens": MAX_NEW_TOKENS}))
    serve.run(deployment(options, replicas=2, threads_per_replica=1), name="florence2", route_prefix="/")
    replicas = serve.status().applications["florence2"].deployments["florence2"].replica_states
    assert replicas.get("RUNNING") == 2

    images = sample_images()
    names = list(images) * 2

    def ask(name: str) -> httpx.Response:
        return httpx.post(local_serve + "/v1/florence2", json={"image": b64(images[name]), "tasks": ["<OD>"]},
                          timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(ask, names))
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint)
    for name, response in zip(names, responses):
        assert response.status_code == 200, response.text
        expected = library_answer(processor, model, images[name], "<OD>", "<OD>", max_new_tokens=MAX_NEW_TOKENS,
                                  num_beams=3)
        assert response.json()["results"] == {"<OD>": expected}

    client = openai.OpenAI(base_url=local_serve + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model=str(checkpoint), max_tokens=MAX_NEW_TOKENS, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images["coffee"])}},
                                     {"type": "text", "text": "<OD>"}]}])
    expected = library_answer(processor, model, images["coffee"], "<OD>", "<OD>", max_new_tokens=MAX_NEW_TOKENS,
                              num_beams=3)
    assert completion.choices[0].message.model_extra["florence2_result"] == expected
    assert httpx.get(local_serve + "/health").json()["status"] == "ok"
