"""What CI can check of the deployment without a Docker engine: the compose files parse and point at files
that exist, the Dockerfile lints (hadolint), the image installs pyproject's own pins, and the monitoring
configuration asks for series the server really exports. docker/smoke.sh builds and runs it for real."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import promql_parser
import pytest
import yaml

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_files_parse_and_reference_existing_files() -> None:
    compose = _compose("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"caveat", "train", "prometheus", "grafana"}
    assert services["train"]["profiles"] == ["train"]
    assert (ROOT / services["caveat"]["build"]["context"] / "Dockerfile").is_file()
    for env_file in services["caveat"]["env_file"]:
        assert (ROOT / env_file).is_file()
    for secret in compose["secrets"].values():
        assert (ROOT / secret["file"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
            else:
                assert source in compose["volumes"], source
    assert services["caveat"]["healthcheck"]["test"][-1].count("/health/ready") == 1
    gpu = _compose("docker-compose.gpu.yml")["services"]["caveat"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_environment_file_names_real_settings() -> None:
    from service.settings import ENV_PREFIX, Settings

    for line in (ROOT / "docker" / "caveat.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key = line.split("=", 1)[0]
            assert key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in Settings.model_fields, key


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_pyprojects_own_pins_and_no_torchvision() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in dockerfile
    # the project itself (with the EXTRAS build argument's extras): pyproject's exact pins
    assert 'pip install $rest_source ".${EXTRAS:+[$EXTRAS]}"' in dockerfile
    extras = set(project["optional-dependencies"]) - {"dev"}
    assert {"store", "ray"} <= extras
    assert "--no-deps -r requirements/nodeps.txt" in dockerfile
    assert "torchvision must not be installed" in dockerfile
    assert not any("torchvision" in d for d in project["dependencies"])
    assert "USER 10001:10001" in dockerfile and 'ENTRYPOINT ["caveat-serve"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health/ready" in dockerfile


def test_pin_checker_finds_a_mismatch(tmp_path) -> None:
    script = ROOT / "docker" / "pins.py"
    good = subprocess.run([sys.executable, str(script), "requirements"], capture_output=True, text=True, check=True)
    freeze = tmp_path / "freeze.txt"
    torch = subprocess.run([sys.executable, str(script), "torch"], capture_output=True, text=True, check=True)
    nodeps = (ROOT / "requirements" / "nodeps.txt").read_text().splitlines()
    lines = [*good.stdout.split(), f"torch=={torch.stdout.strip()}+cpu", *(n for n in nodeps if "==" in n)]
    freeze.write_text("\n".join(lines))
    assert subprocess.run([sys.executable, str(script), "check", str(freeze)], check=False).returncode == 0
    freeze.write_text("\n".join([*lines[:-1], "torchvision==0.29.1"]))
    assert subprocess.run([sys.executable, str(script), "check", str(freeze)], check=False).returncode == 1


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names | {f"{n}_bucket" for n in names} | {f"{n}_total" for n in names}


def test_monitoring_asks_for_series_the_server_exports(exported) -> None:
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]
    assert target["metrics_path"] == "/metrics" and target["static_configs"][0]["targets"] == ["caveat:8000"]
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "caveat.json").read_text())
    used = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"caveat_\w+", t["expr"])}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "latency", "queue", "rows", "abstention", "mutual information", "coverage", "accuracy"):
        assert topic in titles, topic
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            promql_parser.parse(target["expr"])  # raises on a query Prometheus would refuse


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((ROOT / "docker" / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]  # fmt: skip


def test_alert_rules_parse_and_ask_for_exported_series(exported) -> None:
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = _compose("docker-compose.yml")["services"]["prometheus"]["volumes"]
    assert "./docker/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} == {"CaveatCoverageBelowTarget", "CaveatCalibrationErrorHigh"}
    for rule in rules:
        promql_parser.parse(rule["expr"])
        used = set(re.findall(r"caveat_\w+", rule["expr"]))
        assert used and used <= exported, used - exported


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    """``promtool check rules`` and ``promtool test rules docker/alerts.test.yml``: the coverage alert fires when
    coverage falls 5 points under target over an hour of labels, and not before enough labels came in. promtool
    ships with Prometheus (Debian: ``apt-get install prometheus``, which scripts/install.sh does where it can);
    without it, the rules are still parsed by the test above."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus): the alert rules' unit tests did not run")
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run([promtool, *command], cwd=ROOT / "docker", capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
