"""Shared fixtures: a temporary MLflow store per test, tiny Stable Diffusion components built in
code (diffusers' get_dummy_components style), and a tiny phantom data set. No test touches the
network: the Hub is switched off for the whole session."""

from __future__ import annotations

import contextlib
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import mlflow
import pytest
import torch

TINY_PATIENTS = 24  # ~30 frontal train images: enough for batches of 4


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An SQLite store with MLflow's schema, made once: creating the schema takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _forget_active_experiment(monkeypatch):
    """``mlflow.set_experiment`` in an earlier test leaves its id in a module global and in the
    environment; in a fresh store that id does not exist."""
    import mlflow.tracking.fluent

    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(var, "")  # recorded, so teardown restores the state before the test
        monkeypatch.delenv(var)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_store):
    """A fresh SQLite tracking store and working directory (outputs/, .cache/) for one test."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / ".cache"))
    _forget_active_experiment(monkeypatch)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, the more so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dummy_components(seed: int = 0) -> dict:
    from harness.base.components import SDConfig, build_components
    from harness.base.tokenizer import build_tokenizer, medical_corpus

    config = SDConfig.tiny()
    tokenizer = build_tokenizer(medical_corpus() + ["a photo of a red circle"], vocab_size=config.vocab_size,
                                model_max_length=config.max_length)
    torch.manual_seed(seed)
    return build_components(config, tokenizer)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised tiny SD pipeline saved as a diffusers directory (32 px)."""
    from harness.base.components import assemble_pipeline

    path = tmp_path_factory.mktemp("tiny_base") / "pipeline"
    assemble_pipeline(dummy_components()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A tiny phantom CheXpert folder; returns its `CheXpert-v1.0-small` directory."""
    from harness.data.phantom import write_phantom

    return write_phantom(tmp_path_factory.mktemp("phantom"), n_patients=TINY_PATIENTS, seed=0, size=64)


@contextlib.contextmanager
def serve_mlflow(backend_store_uri: str, artifacts: str, timeout: float = 120.0):
    """A real ``mlflow server`` on a free loopback port (artifacts proxied to ``artifacts``); yields
    its URI. The same setup a team shares, with any backend store (SQLite, PostgreSQL)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(artifacts, "..", f"mlflow-server-{port}.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
                             "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow server did not start: {open(log.name).read()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch, empty_store):
    """Tracking through a real ``mlflow server`` over the project's SQLite store."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    (tmp_path / "artifacts").mkdir()
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / ".cache"))
    _forget_active_experiment(monkeypatch)
    with serve_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
        while mlflow.active_run():
            mlflow.end_run()
