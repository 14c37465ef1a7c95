"""No Docker engine runs in CI, so the container files are checked against the code they describe: a renamed
setting, a new package, a moved probe or port would otherwise only show up on someone's deployment."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from conftest import REPO

from app.core.config import ENV_PREFIX, Settings
from app.main import create_app

DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_image_copies_every_package_the_distribution_ships(dockerfile):
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.MULTILINE))
    assert copied == packages
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert {f"!{p}/" for p in packages} <= set(ignore)  # the ignore file lets them into the build context


def test_healthcheck_probes_the_readiness_route_on_the_served_port(dockerfile):
    paths = set(create_app(Settings(_env_file=None, insecure_dev=True)).openapi()["paths"])
    probe = re.search(r"HEALTHCHECK .*?CMD .*?http://127\.0\.0\.1:(\d+)(/\w+)", dockerfile, flags=re.DOTALL)
    assert probe is not None and probe.group(2) == "/readyz" and "/readyz" in paths
    port = probe.group(1)
    assert f"EXPOSE {port}" in dockerfile and f'"--port", "{port}"' in dockerfile
    assert re.search(r"^USER \d+:\d+$", dockerfile, flags=re.MULTILINE)  # numeric, non-root
    assert "USER 0" not in dockerfile and "USER root" not in dockerfile


def test_compose_sets_only_real_settings_and_prometheus_scrapes_the_service(compose):
    service = compose["services"]["clipshot"]
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert set(service["environment"]) <= fields
    published = {int(p.split(":")[1]) for p in service["ports"]}
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "clipshot" and int(port) in published and scrape["metrics_path"] == "/metrics"
    mounts = {volume.split(":")[1] for volume in service["volumes"]}
    assert "/data/store" in mounts  # the image's CLIPSHOT_STORE, so adapters survive the container
