"""`rfp serve`: MLflow's scoring server for a registered translator, offline, from this venv.

`mlflow models serve` starts its server with a shell `exec uvicorn ...`, so it fails with
`uvicorn: not found` unless the venv's bin folder is on PATH, and without `--env-manager local`
it would try to build a fresh environment (a download). This command sets both, points MLflow at
the project's tracking store, checks that the model URI resolves (a missing alias gets a clear
message, not a traceback) and then replaces itself with the server (signals reach it directly).
Request format: see rfp_pipeline/pyfunc_model.py (POST /invocations, GET /ping).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rfp_core.config import ConfigError


def server_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the server: this interpreter's bin folder first on PATH, the
    project's tracking store unless MLFLOW_TRACKING_URI is set."""
    from rfp_core.paths import rfp_home

    env = dict(os.environ if environ is None else environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{rfp_home() / 'mlflow.db'}")
    return env


def server_command(model: str, port: int, host: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model,
        "--port",
        str(port),
        "--host",
        host,
        "--workers",
        str(workers),
        "--env-manager",
        "local",
    ]


def check_model_uri(model: str, tracking_uri: str) -> None:
    """Fail early, in one line, when `models:/NAME@ALIAS` or `models:/NAME/VERSION` does not resolve."""
    if not model.startswith("models:/"):
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = model.removeprefix("models:/")
    client = MlflowClient(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.split("/", 1)
            if version != "latest":
                client.get_model_version(name, version)
        else:
            client.get_registered_model(ref)
    except MlflowException as exc:
        hint = (
            (
                " The evaluation asset sets the 'champion' alias when its checks pass (make demo), or set it by hand: "
                "MlflowClient().set_registered_model_alias(NAME, 'champion', VERSION)."
            )
            if "@" in ref
            else ""
        )
        raise ConfigError(
            f"{model} does not resolve in the tracking store {tracking_uri}: {exc.message.splitlines()[0]}.{hint}"
        ) from None
