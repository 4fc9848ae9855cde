"""`alignkit serve MODEL`: an OpenAI-compatible HTTP server for a local model."""

from __future__ import annotations

import importlib.util

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Argument(..., help="'tiny', a model directory or a fetched model."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(8000, help="Port to listen on."),
        served_model_name: str | None = typer.Option(
            None, help="The name clients send as 'model' (default: MODEL as given)."
        ),
        default_max_tokens: int = typer.Option(
            256, min=1, help="Chat requests without max_tokens generate at most this many."
        ),
        device: str = typer.Option("cpu", help="Where the model runs (cpu, cuda, cuda:1, ...)."),
        dtype: str = typer.Option("float32", help="float32, bfloat16 or auto."),
    ) -> None:
        """Serve MODEL at http://HOST:PORT/v1 (/v1/completions, /v1/chat/completions,
        /v1/models, /health) with alignkit's in-process engine, one request at a time."""
        from alignkit.errors import ConfigError

        for module in ("fastapi", "uvicorn"):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"alignkit serve needs {module}: pip install 'alignkit[serve]'")
        import uvicorn

        from alignkit.models import load_policy
        from alignkit.serving import ServedModel, create_app

        policy, tokenizer = load_policy(model, dtype=dtype)
        policy.to(device)
        served = ServedModel(
            policy, tokenizer, served_model_name or model, default_max_tokens=default_max_tokens
        )
        typer.echo(f"serving '{served.name}' at http://{host}:{port}/v1")
        uvicorn.run(create_app(served), host=host, port=port, log_level="info")
