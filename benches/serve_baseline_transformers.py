"""The baseline of benches/serve_load.py: the server people write around transformers' Florence-2 today.

A minimal FastAPI app, one request at a time (a lock around the model, as the public Flask/FastAPI wrappers
do, since concurrent generate calls on one torch model only fight over the cores), speaking the same native
request as florence2-serve (`POST /v1/florence2` with {"image": base64, "tasks": [...], "max_new_tokens",
"num_beams"}) and answering with post_process_generation's results, so that the load generator can send
both the same requests.

    python benches/serve_baseline_transformers.py --model CHECKPOINT [--port 0] [--threads N] [--dtype float32]

Prints "serve_baseline: listening on http://HOST:PORT" once it accepts connections.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import threading

import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from transformers import AutoProcessor, Florence2ForConditionalGeneration


class Request(BaseModel):
    image: str
    tasks: list[str]
    max_new_tokens: int = 1024
    num_beams: int = 3


def build_app(model_dir: str, dtype: torch.dtype) -> FastAPI:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Florence2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/florence2")
    def florence2(request: Request) -> dict:
        image = Image.open(io.BytesIO(base64.b64decode(request.image))).convert("RGB")
        results = {}
        with lock, torch.inference_mode():
            for task in request.tasks:
                inputs = processor(text=task, images=image, return_tensors="pt").to(dtype)
                ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                     max_new_tokens=request.max_new_tokens, num_beams=request.num_beams,
                                     do_sample=False)
                text = processor.batch_decode(ids, skip_special_tokens=False)[0]
                results.update(processor.post_process_generation(text, task=task, image_size=image.size))
        return {"results": results}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    app = build_app(args.model, getattr(torch, args.dtype))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    print(f"serve_baseline: listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
