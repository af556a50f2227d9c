"""The image (infra/ecs/Dockerfile) built and smoke-tested, where a Docker engine runs.

Elsewhere (no `docker` command, or `docker info` fails: no engine to talk to) every test
here is skipped with that reason; the Dockerfile's text is still checked by test_infra.py
(hadolint, the user, tini, the jars' install, the health check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "ecs" / "Dockerfile"


def _engine() -> tuple[str | None, str]:
    docker = shutil.which("docker")
    if docker is None:
        return None, "no Docker engine here: no `docker` command"
    try:
        info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return None, "no Docker engine here: `docker info` did not answer in 30 s"
    if info.returncode != 0:
        return None, f"no Docker engine here: `docker info` failed: {(info.stderr or info.stdout).strip()[:200]}"
    return docker, ""


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[str, str]]:
    docker, why = _engine()
    if docker is None:
        pytest.skip(why)
    tag = f"orders-cdc:test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run([docker, "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)], capture_output=True,
                           text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        yield docker, tag
    finally:
        subprocess.run([docker, "rmi", "-f", tag], capture_output=True, timeout=120)


def _run(image: tuple[str, str], *argv: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    docker, tag = image
    command = [docker, "run", "--rm", "--network", "none"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    return subprocess.run([*command, tag, *argv], capture_output=True, text=True, timeout=300)


def test_the_image_runs_orders_cdc(image):
    result = _run(image, "orders-cdc", "--help")
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "replay" in result.stdout
    result = _run(image, "orders-cdc", "run", "--help")
    assert result.returncode == 0 and "--properties" in result.stdout, result.stderr


def test_the_kcl_jars_and_a_java_runtime_are_in_the_image(image):
    code = ("from orders_cdc.kcl.daemon import jars_dir; import sys; "
            "jars = sorted(p.name for p in jars_dir().glob('*.jar')); print(len(jars)); "
            "print(*[j for j in jars if j.startswith('amazon-kinesis-client')], sep='\\n')")
    result = _run(image, "-c", code, entrypoint="python")
    assert result.returncode == 0, result.stderr
    count, *kcl = result.stdout.split()
    assert int(count) > 50 and any(j.startswith("amazon-kinesis-client-multilang-") for j in kcl), result.stdout
    java = _run(image, "-version", entrypoint="java")
    assert java.returncode == 0 and "17." in java.stderr, java.stderr


def test_the_image_runs_as_a_non_root_user(image):
    result = _run(image, "-u", entrypoint="id")
    assert result.returncode == 0 and result.stdout.strip() not in ("", "0"), result.stdout + result.stderr
    assert result.stdout.strip() == "10001"


def test_the_c_decoder_is_built_in_the_image(image):
    code = "from orders_cdc import attrvalue; print(int(bool(attrvalue.ACCELERATED)))"
    result = _run(image, "-c", code, entrypoint="python")
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stdout + result.stderr


def test_the_image_declares_the_health_check_and_tini(image):
    docker, tag = image
    inspect = subprocess.run([docker, "image", "inspect", tag], capture_output=True, text=True, timeout=60)
    (config,) = json.loads(inspect.stdout)
    assert config["Config"]["Healthcheck"]["Test"] == ["CMD", "orders-cdc", "health"]
    assert config["Config"]["Entrypoint"][0].endswith("tini")
    assert config["Config"]["User"] == "10001:10001"
