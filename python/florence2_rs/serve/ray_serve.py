"""The HTTP server's app as a Ray Serve deployment: replicas (each loading the model once), CPU threads per
replica, and autoscaling on the number of requests each replica holds.

From Python:

    from ray import serve
    from florence2_rs.serve import ServerOptions
    from florence2_rs.serve.ray_serve import deployment

    serve.run(deployment(ServerOptions(model="microsoft/Florence-2-base"), replicas=2, threads_per_replica=4))

From the command line, with Ray's own `serve run` (the keys are `build_app`'s):

    serve run florence2_rs.serve.ray_serve:build_app model=microsoft/Florence-2-base replicas=2 threads_per_replica=4

Ray's proxy then serves the same endpoints as `florence2-serve` (`/v1/florence2`, `/v1/chat/completions`,
`/v1/models`, `/health`, `/metrics` per replica). Needs `pip install "florence2-rs[serve]" "ray[serve]"`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from .app import ServerOptions, create_app, load_engine
from .engine import DEFAULT_GENERATION, EngineOptions


class Florence2Replica:
    """The replica class Ray Serve wraps around the app (built in each replica by `_app_builder`)."""

    def check_health(self) -> None:
        """Ray's replica health check: fails when the engine is gone."""
        if self.app.state.server.engine is None:
            raise RuntimeError("the Florence-2 engine is not loaded")


def _app_builder(options: ServerOptions, threads: int) -> Callable[[], Any]:
    """The function each replica calls at its start to build its app: it loads the model there and then (so
    Ray routes to a replica only once it can answer) with `threads` CPU threads."""

    def build() -> Any:
        # rayon sizes its pool from this variable at the first model call; without it every replica would
        # start one thread per core of the node and the replicas would fight over the cores.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        app = create_app(options)
        state = app.state.server
        state.engine = load_engine(options, state.metrics)
        return app

    return build


def deployment(options: ServerOptions, *, replicas: int = 1, threads_per_replica: int = 1,
               autoscaling: Optional[Dict[str, Any]] = None) -> Any:
    """The bound Ray Serve application.

    Args:
        options: the server options (model, batching, limits).
        replicas: how many replicas (without `autoscaling`).
        threads_per_replica: CPUs Ray reserves for each replica, and the threads its model uses.
        autoscaling: Ray Serve's `autoscaling_config` (such as `{"min_replicas": 1, "max_replicas": 4}`); its
            default target is `max_batch_size` requests held per replica, so that a replica gets new
            requests while its batches are full and Ray adds replicas when the queues grow.

    Returns:
        The application, for `serve.run`.
    """
    from ray import serve

    ingress = serve.ingress(_app_builder(options, threads_per_replica))(Florence2Replica)
    scaling: Dict[str, Any] = {"num_replicas": replicas}
    if autoscaling is not None:
        scaling = {"autoscaling_config": {"target_ongoing_requests": options.engine.max_batch_size, **autoscaling}}
    return serve.deployment(
        ingress, name="florence2",
        # The replica's own queue admits and batches; Ray holds back the requests beyond it.
        max_ongoing_requests=options.engine.max_queue + options.engine.max_batch_size,
        ray_actor_options={"num_cpus": threads_per_replica},
        **scaling,
    ).bind()


def build_app(args: Dict[str, str]) -> Any:
    """The application builder for `serve run florence2_rs.serve.ray_serve:build_app key=value ...`.

    Keys: model (required), dtype, quantize, replicas, threads_per_replica, min_replicas and max_replicas
    (autoscaling), max_batch_size, max_wait_ms, max_queue, max_new_tokens, num_beams.
    """
    if "model" not in args:
        raise ValueError("build_app needs model=ID_OR_DIR")
    generation = {**DEFAULT_GENERATION, "max_new_tokens": int(args.get("max_new_tokens", 1024)),
                  "num_beams": int(args.get("num_beams", 3))}
    engine = EngineOptions(max_batch_size=int(args.get("max_batch_size", 8)),
                           max_wait_ms=float(args.get("max_wait_ms", 5)), max_queue=int(args.get("max_queue", 64)),
                           generation=generation)
    options = ServerOptions(model=args["model"], dtype=args.get("dtype", "auto"), quantize=args.get("quantize"),
                            engine=engine)
    autoscaling = None
    if "max_replicas" in args:
        autoscaling = {"min_replicas": int(args.get("min_replicas", 1)), "max_replicas": int(args["max_replicas"])}
    return deployment(options, replicas=int(args.get("replicas", 1)),
                      threads_per_replica=int(args.get("threads_per_replica", 1)), autoscaling=autoscaling)
