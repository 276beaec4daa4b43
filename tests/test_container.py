"""The container image and the Kubernetes manifests, checked without Docker or a cluster:
the Dockerfile lints clean with hadolint, the manifests validate against Kubernetes' schemas."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
MANIFESTS = sorted((ROOT / "docs" / "kubernetes").glob("*.yaml"))


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(found).exists(), f"{name} is not installed (it comes with the test extra)"
    return found


def test_dockerfile_lints_clean():
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE),
                             str(ROOT / "container" / "cpu-base.Containerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_says_what_the_product_needs():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith("vllm/vllm-openai:v") and not base.endswith(":latest")
    assert "lmsysorg/sglang:v" in text  # the documented build argument for SGLang
    assert 'ENTRYPOINT ["tini", "--", "lora-entrypoint", "serve"]' in text
    assert re.search(r"^USER 1000:1000$", text, re.M)  # not root by default
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert "--editable" not in text  # installed as a normal package
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/v1/health/ready", text, re.M)
    assert "NIM_PEFT_SOURCE=/opt/nim/loras" in text and "NIM_CACHE_PATH=/opt/nim/.cache" in text
    assert not re.search(r"(?i)(token|secret|password)\s*=", text)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(manifest):
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(manifest)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployment_shares_adapters_and_probes_the_nim_routes():
    deployment = yaml.safe_load((ROOT / "docs/kubernetes/deployment.yaml").read_text())
    spec = deployment["spec"]
    assert spec["replicas"] > 1
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v1/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert pod["terminationGracePeriodSeconds"] >= 30
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["adapters"]["persistentVolumeClaim"]["claimName"]
    pvc = yaml.safe_load((ROOT / "docs/kubernetes/adapters-pvc.yaml").read_text())
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in volumes["cache"]  # snapshots stay per replica
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NIM_PEFT_SOURCE"] == "/opt/nim/loras" and env["NIM_MAX_LORA_RANK"]
    service = yaml.safe_load((ROOT / "docs/kubernetes/service.yaml").read_text())
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
