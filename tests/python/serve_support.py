"""Helpers shared by the serving tests: test images, the library's own answer (the parity reference), and a
server subprocess on a free port."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from florence2_rs.apps.labeling import scored_answer

WRAPPER = Path(__file__).resolve().parent / "serve_wrapper.py"


def sample_images() -> dict[str, bytes]:
    """PNG files of a few scikit-image pictures of different sizes, by name."""
    import skimage

    pictures = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
                "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket()}
    return {name: png(array) for name, array in pictures.items()}


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def library_answer(processor: Any, model: Any, data: bytes, prompt: str, task: str, **settings: Any) -> Any:
    """The library's answer for one image alone: processor + generate + post_process_generation, with the
    per-box scores of `florence2_rs.apps.labeling.scored_answer`, as JSON gives it back."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    inputs = processor(text=prompt, images=image, return_tensors="np")
    out = model.generate(**inputs, return_dict_in_generate=True, **settings)
    text = processor.batch_decode(out.sequences, skip_special_tokens=False)[0]
    answer = processor.post_process_generation(text, task=task, image_size=image.size)[task]
    if isinstance(answer, dict):
        scored = scored_answer(processor, task, out.sequences[0], out.token_scores[0], image.size)
        assert {key: scored[key] for key in answer} == answer
        answer = scored
    return json.loads(json.dumps(answer))


class ServerProcess:
    """`florence2-serve` (through tests/python/serve_wrapper.py) as a subprocess on a free port.

    Args:
        args: the command's arguments (--port 0 is added).
        env: extra environment variables (the wrapper's test controls).
        timeout: seconds to wait for the address line and for /health to answer 200.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WRAPPER), *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._collect, daemon=True).start()
        deadline = time.monotonic() + timeout
        line = None
        while line is None and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                pass
        if line is None:
            self.kill()
            time.sleep(0.2)  # the last lines of stderr
            raise RuntimeError(f"no address line from the server; stderr: {''.join(self.stderr)[-2000:]}")
        prefix = "florence2-serve: listening on "
        assert line.startswith(prefix), line
        self.url = line[len(prefix):].strip()
        self.wait_healthy(timeout)

    @staticmethod
    def _read(stream: Any, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {''.join(self.stderr)[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become healthy")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when the sample is absent)."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if _canonical(key) == want:
                return float(value)
        return 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 30, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name}{labels} never reached {value}: {self.metric(name, **labels)}"
            time.sleep(0.02)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _canonical(key: str) -> str:
    """`name{b="2",a="1"}` with its labels sorted, to compare with a wanted sample."""
    if "{" not in key:
        return key
    name, _, rest = key.partition("{")
    labels = sorted(part for part in rest.rstrip("}").split(",") if part)
    return name + "{" + ",".join(labels) + "}"
