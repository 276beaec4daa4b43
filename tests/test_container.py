"""The container image and the Kubernetes manifests, checked without Docker or a cluster:
the Dockerfile lints clean with hadolint, the manifests validate against Kubernetes' schemas
(kubernetes-validate) and the fleet examples' custom resources against their projects' CRD
schemas, vendored in tests/fixtures/crds/ (jsonschema)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KUBE = ROOT / "docs" / "kubernetes"
CRDS = ROOT / "tests" / "fixtures" / "crds"

# What kubernetes-validate cannot check (it only warns "Couldn't find schema" and exits 0): each
# kind's schema, vendored from its project (see the header of each file).
CUSTOM_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"):
        "inferencepools.inference.networking.k8s.io-v1.yaml",
    ("model.aibrix.ai/v1alpha1", "ModelAdapter"): "modeladapters.model.aibrix.ai-v1alpha1.yaml",
    # not a Kubernetes object but the endpoint picker's config file; hand-derived schema
    ("llm-d.ai/v1alpha1", "EndpointPickerConfig"):
        "endpointpickerconfig.llm-d.ai-v1alpha1.hand-derived.yaml",
}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def is_custom(doc: dict) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_SCHEMAS


ALL_YAML = sorted(KUBE.rglob("*.yaml"))
# files of Kubernetes' own kinds (one kind of file or the other: see test_every_manifest_...)
MANIFESTS = [p for p in ALL_YAML if not any(is_custom(d) for d in documents(p))]
CUSTOM_DOCS = [(p, i) for p in ALL_YAML for i, d in enumerate(documents(p)) if is_custom(d)]


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


@pytest.fixture(scope="module")
def validated() -> list[str]:
    """kubernetes-validate's lines for every manifest, in one run of it (one line per resource:
    `LEVEL path ...`)."""
    result = subprocess.run([tool("kubernetes-validate"), "--strict", *map(str, MANIFESTS)],
                            capture_output=True, text=True, timeout=120)
    return (result.stdout + result.stderr).splitlines()


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(KUBE)))
def test_manifest_validates(manifest, validated):
    said = [line for line in validated if line.split(" ", 2)[1:2] == [str(manifest)]]
    documents_in = sum(1 for doc in documents(manifest) if doc)
    # every resource passed; an unknown kind is only a warning there (exit 0): it would go
    # unchecked, so a warning fails too
    assert len(said) == documents_in and all(
        line.startswith("INFO ") and " passed for resource " in line for line in said), said


def test_every_manifest_is_checked_by_one_validator_or_the_other():
    assert MANIFESTS and CUSTOM_DOCS
    for path in ALL_YAML:
        custom = {is_custom(doc) for doc in documents(path)}
        assert len(custom) == 1, f"{path}: mixes custom resources with Kubernetes' own kinds"


# ---- custom resources: their CRD's openAPIV3Schema, read as the API server reads it ----------

# The API server rejects unknown fields of a custom resource under strict field validation
# (`kubectl apply`'s default, --validate=strict) and silently drops them otherwise: either way
# a misspelled field does not do what the example says. The CRD schemas leave unknown fields
# to that mechanism, so every object schema that lists its properties is closed here.
def closed(schema: object, *, itself: bool = True) -> object:
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    # `if` is a condition, not a shape (left as it is); `then`/`else` add to the shape of the
    # object they sit in (closed inside only)
    out = {key: value if key == "if" else closed(value, itself=key not in ("then", "else"))
           for key, value in schema.items()}
    if (itself and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


# The CRDs leave metadata as `type: object`; the API server checks it as ObjectMeta.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
OBJECT_META = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# The CRDs' CEL rules (x-kubernetes-validations), translated by hand, keyed by their exact
# text: a rule not listed here fails the test instead of going unchecked.
CEL_RULES = {
    "self.kind != 'Service' || has(self.port)":  # endpointPickerRef; kind defaults to Service
        lambda ref: ref.get("kind", "Service") != "Service" or "port" in ref,
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))":  # targetPorts
        lambda ports: len({p["number"] for p in ports}) == len(ports),
}


def cel_failures(schema: dict, value: object, where: str = "") -> list[str]:
    failures = []
    for check in schema.get("x-kubernetes-validations", []):
        rule = check["rule"]
        if rule not in CEL_RULES:
            failures.append(f"{where or '.'}: no translation for the CEL rule {rule!r}")
        elif not CEL_RULES[rule](value):
            failures.append(f"{where or '.'}: {check.get('message', rule)}")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                failures += cel_failures(sub, item, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for n, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{where}[{n}]")
    return failures


def custom_resource_problems(doc: dict) -> list[str]:
    schema = yaml.safe_load((CRDS / CUSTOM_SCHEMAS[doc["apiVersion"], doc["kind"]]).read_text())
    strict = closed(schema)
    if doc["kind"] != "EndpointPickerConfig":  # a Kubernetes object, with ObjectMeta
        strict["properties"]["metadata"] = OBJECT_META
        strict.setdefault("required", []).append("metadata")
    validator = jsonschema.Draft7Validator(strict)
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
                for e in validator.iter_errors(doc)]
    return problems + cel_failures(schema, doc)


@pytest.mark.parametrize("path,index", CUSTOM_DOCS,
                         ids=[f"{p.relative_to(KUBE)}#{i}" for p, i in CUSTOM_DOCS])
def test_custom_resource_validates_against_its_vendored_schema(path, index):
    doc = documents(path)[index]
    assert custom_resource_problems(doc) == []


def test_a_misspelled_field_fails_the_schema_check():
    # the examples' own objects, each with one field name misspelled
    pool = documents(KUBE / "llm-d" / "inferencepool.yaml")[0]
    pool["spec"]["targetPort"] = pool["spec"].pop("targetPorts")
    assert any("targetPort" in p for p in custom_resource_problems(pool))
    adapter = documents(KUBE / "aibrix" / "modeladapter.yaml")[0]
    adapter["spec"]["artifactUrl"] = adapter["spec"].pop("artifactURL")
    assert any("artifactUrl" in p for p in custom_resource_problems(adapter))
    epp = documents(KUBE / "llm-d" / "epp-config.yaml")[0]
    engine = next(p for p in epp["plugins"] if p["type"] == "core-metrics-extractor")
    engine["parameters"]["engineConfigs"][0]["loRASpec"] = "vllm:lora_requests_info"
    assert any("loRASpec" in p for p in custom_resource_problems(epp))
    # and a CEL rule: an endpoint picker Service without its port
    pool = documents(KUBE / "llm-d" / "inferencepool.yaml")[0]
    del pool["spec"]["endpointPickerRef"]["port"]
    assert any("port is required" in p for p in custom_resource_problems(pool))


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


# ---- the fleet examples fit together (and fit the entrypoint) ---------------------------------

def pod_of(deployment: dict) -> tuple[dict, dict, dict]:
    """(pod template labels, container, env name -> value or valueFrom) of a Deployment."""
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    return template["metadata"]["labels"], container, env


# llm-d/llm-d-router v0.10.0, pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go,
# defaultEngineConfigs: the built-in SGLang entry, which a user entry named "sglang" replaces
BUILTIN_SGLANG = {
    "queuedRequestsSpec": "sglang:num_queue_reqs",
    "runningRequestsSpec": "sglang:num_running_reqs",
    "kvUsageSpec": "sglang:token_usage",
    "loraSpec": "",
    "cacheInfoSpec": "sglang:cache_config_info",
    "cacheBlockSizeLabelName": "page_size",
    "cacheNumBlocksLabelName": "num_pages",
}


def test_llm_d_pool_selects_sglang_pods_and_reads_their_lora_series():
    pool = documents(KUBE / "llm-d" / "inferencepool.yaml")[0]["spec"]
    labels, container, env = pod_of(documents(KUBE / "llm-d" / "deployment-sglang.yaml")[0])
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    assert pool["targetPorts"] == [{"number": container["ports"][0]["containerPort"]}]
    assert pool["targetPorts"] == [{"number": 8000}] and "NIM_SERVER_PORT" not in env
    assert pool["endpointPickerRef"]["name"] and pool["endpointPickerRef"]["port"]["number"]
    assert labels["llm-d.ai/engine-type"] == "sglang"
    assert labels["inference.networking.k8s.io/engine-type"] == "sglang"  # older pickers
    assert env["NIM_MODEL_PROFILE"].startswith("sglang-")
    assert "--enable-metrics" in env["NIM_PASSTHROUGH_ARGS"].split()  # SGLang's own sglang:*

    epp = documents(KUBE / "llm-d" / "epp-config.yaml")[0]
    plugins = {p.get("name", p["type"]): p for p in epp["plugins"]}
    engines = plugins["core-metrics-extractor"]["parameters"]["engineConfigs"]
    sglang = next(e for e in engines if e["name"] == labels["llm-d.ai/engine-type"])
    assert sglang == {"name": "sglang", **BUILTIN_SGLANG, "loraSpec": "vllm:lora_requests_info"}
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics"
    refs = [ref["pluginRef"] for profile in epp["schedulingProfiles"] for ref in profile["plugins"]]
    refs += [s["pluginRef"] for s in epp["dataLayer"]["sources"]]
    refs += [x["pluginRef"] for s in epp["dataLayer"]["sources"] for x in s["extractors"]]
    assert set(refs) <= set(plugins)
    assert plugins["lora-affinity-scorer"]["type"] == "lora-affinity-scorer"
    assert "lora-affinity-scorer" in refs


def test_aibrix_pods_carry_the_labels_its_controller_selects_on():
    deployment = documents(KUBE / "aibrix" / "deployment.yaml")[0]
    labels, container, env = pod_of(deployment)
    port = str(container["ports"][0]["containerPort"])
    assert port == "8000" and "NIM_SERVER_PORT" not in env  # the controller calls :8000
    assert labels["adapter.model.aibrix.ai/enabled"] == "true"
    assert labels["model.aibrix.ai/name"] == env["NIM_SERVED_MODEL_NAME"]
    assert labels["model.aibrix.ai/engine"] in ("vllm", "sglang")
    assert labels["model.aibrix.ai/port"] == labels["model.aibrix.ai/metric-port"] == port
    # the model router builds its HTTPRoute from the Deployment's own labels, to the Service
    # named like the model, on the port label
    meta = deployment["metadata"]["labels"]
    assert meta["model.aibrix.ai/name"] == labels["model.aibrix.ai/name"]
    assert meta["model.aibrix.ai/port"] == port
    service = documents(KUBE / "aibrix" / "service.yaml")[0]
    assert service["metadata"]["name"] == labels["model.aibrix.ai/name"]
    assert service["spec"]["ports"][0]["port"] == int(port)
    assert service["spec"]["selector"].items() <= labels.items()
    # dynamic mode, so the runtime adapter API answers
    assert env["NIM_PEFT_SOURCE"] and env["NIM_PEFT_REFRESH_INTERVAL"]
    assert env.get("NIM_PEFT_API_ENABLED", "true") != "false"
    # the key comes from a Secret, never a literal
    assert env["VLLM_API_KEY"]["secretKeyRef"]["key"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/opt/nim/.cache"]["name"]]  # survives container restarts
    allowed = env["NIM_PEFT_API_ALLOWED_PATHS"].split(":")

    adapters = documents(KUBE / "aibrix" / "modeladapter.yaml")
    assert {a["spec"].get("replicas") for a in adapters} == {None, 1}
    for adapter in adapters:
        spec = adapter["spec"]
        # the entrypoint's adapter-name rule (entrypoint/adapters.py, NAME_PATTERN)
        assert re.fullmatch(r"[A-Za-z0-9._-]+", adapter["metadata"]["name"])
        assert spec["baseModel"] == labels["model.aibrix.ai/name"]
        assert "matchExpressions" not in spec["podSelector"]  # the controller reads matchLabels
        assert spec["podSelector"]["matchLabels"].items() <= labels.items()
        # sent unchanged as lora_path: must be under an allowed folder mounted in the pod
        root = next(a for a in allowed if spec["artifactURL"].startswith(a.rstrip("/") + "/"))
        assert mounts[root]["readOnly"] is True
        assert spec["additionalConfig"]["api-key"] == "${LORA_API_KEY}"  # filled at apply time


def test_the_s3_example_reads_its_adapters_from_a_bucket():
    """The object-store example: no adapter volume, the source an s3:// URL the settings accept,
    and the keys from the Secret the same folder defines."""
    from entrypoint.sources.s3_client import S3Url

    deployment = documents(KUBE / "s3" / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    url = S3Url.parse(env["NIM_PEFT_SOURCE"]["value"])
    assert (url.bucket, url.prefix) == ("my-adapters", "loras/")
    assert "adapters" not in {v["name"] for v in pod["volumes"]}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["cache"]
    others = {d["kind"]: d for d in documents(KUBE / "s3" / "serviceaccount.yaml")}
    assert pod["serviceAccountName"] == others["ServiceAccount"]["metadata"]["name"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == others["Secret"]["metadata"]["name"]
        assert ref["key"] in others["Secret"]["stringData"]
