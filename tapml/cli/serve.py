"""`tapml serve`: a model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from tapml.errors import TapmlError

from .options import buckets_option, compile_options, refuse_artifact_conflicts, threads_option

API_KEY_ENV = "TAPML_API_KEY"


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0: any free port.")
@click.option("--api-key-file", type=click.Path(dir_okay=False),
              help=f"A file holding the key clients must send as 'Authorization: Bearer KEY' "
                   f"(else ${API_KEY_ENV}; none: no key asked).")
@click.option("--allow-no-key", is_flag=True,
              help="Serve a non-loopback address without an API key (anyone who reaches it "
                   "can use the model).")
@click.option("--max-queue", type=click.IntRange(0), default=16, show_default=True,
              help="Requests that may wait while one is served; more are answered 429.")
@click.option("--max-body-mb", type=click.FloatRange(0.01), default=4.0, show_default=True,
              help="Largest request body; a larger one is answered 413.")
@click.option("--name", "model_id", metavar="NAME",
              help="The model's id in the API [default: MODEL's name].")
@click.option("--device", "device_url", metavar="URL",
              help="Run the kernels on a remote device (tapml://HOST:PORT, a tapml device agent).")
@compile_options
@buckets_option
@threads_option
@click.pass_obj
def command(obj, model, host, port, api_key_file, allow_no_key, max_queue, max_body_mb,
            model_id, device_url, target, quantization, max_context, chunk, target_options,
            kv_cache, buckets, threads) -> None:  # fmt: skip
    """Serve MODEL over the OpenAI API until interrupted (Ctrl-C).

    MODEL is a name from `tapml models`, a GGUF or checkpoint, a compiled directory or a
    bundle. A text model answers /v1/chat/completions and /v1/completions (streamed or not,
    response_format JSON schemas enforced by tapml's grammar), an embedding model
    /v1/embeddings; /v1/models lists it and /health shows the queue. Requests are served
    one at a time, in the order they come. The URL of the API (http://HOST:PORT/v1) is
    printed on stdout once it listens.

    \b
    Examples:
      tapml serve smollm2-135m --port 8000
      tapml serve all-minilm-l6-v2 --port 8001
      tapml serve smollm2-135m --host 0.0.0.0 --api-key-file ~/.tapml-key

    \b
    From Python, with the openai package:
      client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
      client.chat.completions.create(model="smollm2-135m", messages=[...])
    """
    from tapml.targets.remote.server import is_loopback

    refuse_artifact_conflicts(model)
    api_key = _api_key(api_key_file)
    if not is_loopback(host) and api_key is None and not allow_no_key:
        raise TapmlError(f"refusing to serve {host} without an API key: anyone who reaches it "
                         f"could use the model. Give --api-key-file F (or set ${API_KEY_ENV}), "
                         "or pass --allow-no-key")  # fmt: skip
    listener = _listen(host, port)  # before the model loads: a taken port fails fast
    runtime = _load(obj, model, device_url, target, quantization, max_context, chunk,
                    target_options, kv_cache, buckets, threads)  # fmt: skip
    _serve(runtime, model_id or _model_name(model), listener, api_key, max_queue, max_body_mb)


def _api_key(path: str | None) -> str | None:
    from tapml.fileio import read_secret

    return read_secret(path, "API key") if path else os.environ.get(API_KEY_ENV) or None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise TapmlError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    listener.listen(128)
    return listener


def _model_name(model: str) -> str:
    """The id clients name the model by: a zoo name as given, a file or directory's name."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def _load(obj, model, device_url, target, quantization, max_context, chunk, target_options,
          kv_cache, buckets, threads):  # fmt: skip
    """The model's Engine or Embedder, its kernels here or on the device at `device_url`."""
    from tapml.api import artifact_for
    from tapml.artifact import Artifact
    from tapml.models import model_task
    from tapml.runtime.engine import load_runtime
    from tapml.targets.llvm import use_threads

    use_threads(threads)  # before TVM's thread pool starts
    artifact = artifact_for(model, target, quantization, max_context, chunk, target_options,
                            obj["progress"], kv_cache, buckets)  # fmt: skip
    if model_task(artifact) not in ("causal_lm", "embedding"):
        raise TapmlError(f"{model} is neither a text nor an embedding model: nothing to serve")
    if device_url is None:
        return load_runtime(artifact)
    from tapml.targets.remote import open_executor

    compiled = Artifact(artifact)
    executor = open_executor(device_url, compiled.target, compiled.plan(), artifact)
    executor.load_params(compiled.weights())
    return load_runtime(artifact, executor=executor)


def _serve(runtime, model_id: str, listener: socket.socket, api_key: str | None,
           max_queue: int, max_body_mb: float) -> None:  # fmt: skip
    import logging

    import uvicorn

    from tapml.server.app import Server

    server = Server(runtime, model_id, api_key, max_queue, max_body_mb)
    verbose = logging.getLogger("tapml").isEnabledFor(logging.DEBUG)  # tapml -v: each request
    # open connections are bounded too (uvicorn answers 503 past it): the queue's, and room
    # for those it refuses and for /health
    config = uvicorn.Config(server.app, log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=5,
                            limit_concurrency=2 * max_queue + 32)  # fmt: skip
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"http://{shown}:{port}/v1")
    click.echo(f"tapml serve: {model_id} on {runtime.target}; API key "
               f"{'required' if api_key else 'not required'}; Ctrl-C stops it", err=True)
    uvicorn.Server(config).run(sockets=[listener])
