"""Serving Florence-2: an HTTP server with dynamic batching (native and OpenAI-compatible endpoints), an MCP
server, and the same app as a Ray Serve deployment. Needs `pip install "florence2-rs[serve]"`.

- `florence2-serve` (`serve.cli`): the HTTP server; `create_app` (`serve.app`) gives its FastAPI app.
- `florence2-mcp` (`serve.mcp_server`): the MCP server (stdio, or streamable HTTP).
- `serve.ray_serve`: the app as a Ray Serve deployment (replicas, autoscaling on queue length).

Modules: `schemas` (request bodies), `images` (decoding within limits), `engine` (queue and batching),
`metrics` (Prometheus), `app` (endpoints and admission).
"""

from .app import ServerOptions, create_app
from .engine import Engine, EngineOptions
from .images import ImageLimits

__all__ = ["Engine", "EngineOptions", "ImageLimits", "ServerOptions", "create_app"]
