"""Deployment files: the Dockerfile (linted; its install steps run for real in a fresh venv),
docker-compose.yml wiring, and the nginx example (checked by nginx itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.harness import ROOT

pytestmark = pytest.mark.ops


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_non_root_layers_dependencies_first_and_checks_health():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[-1].startswith("ENTRYPOINT")
    assert any(line.startswith("USER 10001") for line in lines)
    install_deps = next(
        i for i, line in enumerate(lines) if "install-deps.sh" in line and line.startswith("RUN")
    )
    first_source = next(i for i, line in enumerate(lines) if line.startswith("COPY engine/"))
    assert install_deps < first_source, "dependencies must be installed before the source is copied"
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/models", "/data"]' in text and "MODELSCOPE_CACHE=/models" in text
    assert text.startswith("# voxaffect") and "ARG BASE=nvidia/cuda:" in text


def test_compose_wires_the_server_postgres_prometheus_and_grafana_provisioning():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"voxaffect", "postgres", "prometheus", "grafana"}
    server = services["voxaffect"]
    db = server["environment"]["VOXAFFECT_DB"]
    pg = services["postgres"]["environment"]
    assert db.startswith(f"postgresql://{pg['POSTGRES_USER']}:") and db.endswith(
        f"@postgres/{pg['POSTGRES_DB']}"
    )
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{volume}: no such file in the project"
    prometheus = yaml.safe_load((ROOT / "grafana/prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "voxaffect:5000" and "5000:5000" in services["voxaffect"]["ports"]
    datasource = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_nginx_example_is_valid_nginx():
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    result = subprocess.run(
        [nginx, "-t", "-c", str(ROOT / "deploy/nginx.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


@pytest.mark.image
def test_the_image_install_steps_work_in_a_fresh_virtualenv(tmp_path):
    """The Dockerfile's commands, run for real (Docker itself cannot run here)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the image's steps; compiling bytecode for every file of torch is left out (half the time)
    env = {
        **os.environ,
        "PIP": str(venv / "bin/pip"),
        "TORCH": "torch==2.13.0",
        "PIP_NO_COMPILE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(
        [str(ROOT / "scripts/install-deps.sh")],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    subprocess.run(
        [str(venv / "bin/pip"), "install", "--no-cache-dir", "--no-deps", "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = subprocess.run(
        [str(venv / "bin/voxaffect"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and "VOXAFFECT_MODEL" in out.stdout
    check = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import torch, funasr, webrtcvad, opensmile, soxr, flask_socketio, "
            "flask_sock, redis; print(torch.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().splitlines()[-1].startswith("2.13.0")  # funasr chats first
