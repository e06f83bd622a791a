"""The Kubernetes manifests (deploy/kubernetes/, docs/operations-kubernetes.md), proved without
a cluster: every overlay renders with ``kubectl kustomize``, every object is valid against the
Kubernetes schemas (KEDA's and CloudNativePG's resources against their CRDs' schemas, kept in
tests/kubernetes/), and the promises hold: the engine drains within its grace period, runs as
nobody special on a read-only root, has probes that mean something, and reads the Secrets and
settings it says; KEDA's query runs on the real database."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from animus_core import Db
from animus_core.cli import build_parser
from animus_core.faculties.toml import load_file
from tests.support import raw

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir())
CRDS = Path(__file__).parent / "kubernetes"
#: the Kubernetes version the manifests are checked against
KUBERNETES = "1.30"
#: what the engine may take after SIGTERM beyond --grace: flushing telemetry
FLUSH = 20


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (scripts/test installs Debian's kubernetes-client)"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(overlay: str, kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in rendered(overlay)
             if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def container(overlay: str, deployment: str) -> dict[str, Any]:
    [c] = find(overlay, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = c
    return found


def crd_schema(obj: dict[str, Any]) -> dict[str, Any] | None:
    group, _, version = obj["apiVersion"].rpartition("/")
    path = CRDS / f"{group}_{obj['kind']}_{version}.json"
    schema: dict[str, Any] | None = json.loads(path.read_text()) if path.exists() else None
    return schema


def test_the_overlays_are_the_documented_ones() -> None:
    assert OVERLAYS == ["dev", "production"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid(overlay: str) -> None:
    kinds = set()
    for obj in rendered(overlay):
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        kinds.add(obj["kind"])
        schema = crd_schema(obj)
        if schema is not None:
            errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
            assert not errors, f"{where}: {errors}"
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where}: {e.message} at {list(e.path)}") from None
    assert kinds >= {"Deployment", "Job", "ScaledObject", "TriggerAuthentication", "Cluster",
                     "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount", "ConfigMap",
                     "Service"}


def test_a_broken_object_is_caught() -> None:
    """The checks above can fail: an unknown field, and a ScaledObject without a target."""
    engine = json.loads(json.dumps(find("dev", "Deployment", "animus-engine")))
    engine["spec"]["template"]["spec"]["containers"][0]["livnessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(engine, KUBERNETES, strict=True)
    scaled = json.loads(json.dumps(find("dev", "ScaledObject", "animus-engine")))
    del scaled["spec"]["scaleTargetRef"]
    assert list(jsonschema.Draft7Validator(crd_schema(scaled) or {}).iter_errors(scaled))


def engine_args(overlay: str) -> argparse.Namespace:
    args = container(overlay, "animus-engine")["args"]
    assert args[:2] == ["animus", "up"]
    return build_parser().parse_args(args[1:])  # the real parser: no option drifts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_engine_drains_before_it_is_killed(overlay: str) -> None:
    spec = find(overlay, "Deployment", "animus-engine")["spec"]
    args = engine_args(overlay)
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > args.grace + FLUSH
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = find(overlay, "PodDisruptionBudget", "animus-engine")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= \
        spec["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_runs_as_root_or_writes_its_image(overlay: str) -> None:
    pods = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in rendered(overlay)
            if o["kind"] in ("Deployment", "Job")]
    assert len(pods) == 3
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"]) == \
                (True, False), name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"requests", "limits"} <= c["resources"].keys(), name
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert {"/var/lib/animus", "/tmp"} <= mounts, f"{name}: writable home and /tmp"
    account = find(overlay, "ServiceAccount", "animus")
    assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_probes_are_the_engines_own(overlay: str) -> None:
    c = container(overlay, "animus-engine")
    host, _, port = engine_args(overlay).probes.rpartition(":")
    [declared] = [p for p in c["ports"] if p["name"] == "probes"]
    assert (host, int(port)) == ("0.0.0.0", declared["containerPort"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "probes"}
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"


def documented_settings() -> set[str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", text, re.M))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_read_the_secrets_and_settings_animus_reads(overlay: str) -> None:
    env = {e["name"]: e for e in container(overlay, "animus-engine")["env"]}
    assert env.keys() <= documented_settings()
    secret = {name: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
              for name, e in env.items() if "valueFrom" in e}
    assert secret == {"DATABASE_URL": ("animus-db-app", "uri"),
                      "ANTHROPIC_API_KEY": ("animus-secrets", "anthropic-api-key"),
                      "ANIMUS_AUDIT_KEY": ("animus-secrets", "audit-key")}
    migrate = find(overlay, "Job", "animus-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert migrate["args"] == ["animus", "db", "migrate"]
    assert build_parser().parse_args(migrate["args"][1:]).handler.__name__ == "migrate"
    console = {e["name"]: e for e in container(overlay, "animus-console")["env"]}
    assert console.keys() <= documented_settings()
    assert console["ANIMUS_WEB_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "animus-secrets"
    cluster = find(overlay, "Cluster", "animus-db")  # CloudNativePG names its app Secret so
    assert f"{cluster['metadata']['name']}-app" == secret["DATABASE_URL"][0]
    assert cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQL"] == [
        "CREATE EXTENSION IF NOT EXISTS vector"]


def test_the_dev_secrets_are_usable_and_production_makes_none() -> None:
    [dev] = [o for o in rendered("dev") if o["kind"] == "Secret"]
    import base64
    values = {k: base64.b64decode(v).decode() for k, v in dev["data"].items()}
    assert len(values["audit-key"]) >= 32
    assert len(values["web-secret"]) >= 32
    assert not [o for o in rendered("production") if o["kind"] == "Secret"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_faculties_come_from_a_configmap_the_engine_loads(
        overlay: str, tmp_path: Path) -> None:
    engine = find(overlay, "Deployment", "animus-engine")["spec"]["template"]["spec"]
    c = engine["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == env["ANIMUS_FACULTIES"]]
    [volume] = [v for v in engine["volumes"] if v["name"] == mount["name"]]
    config = find(overlay, "ConfigMap", volume["configMap"]["name"])
    assert config["data"]
    for name, text in config["data"].items():
        (tmp_path / name).write_text(text)
        # commands resolve against the engine's working directory: the image's /opt/animus
        # (Dockerfile WORKDIR), whose faculties/ is the repository's
        faculty = load_file(tmp_path / name, cwd=ROOT)
        assert faculty.name == tomllib.loads(text)["faculty"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_kedas_query_runs_on_the_database(overlay: str, db: Db, db_url: str) -> None:
    scaled = find(overlay, "ScaledObject", "animus-engine")["spec"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "postgresql"
    assert int(trigger["metadata"]["targetQueryValue"]) == engine_args(overlay).concurrency
    assert scaled["scaleTargetRef"]["name"] == "animus-engine"
    async with raw(db_url) as conn:
        depth = await conn.fetchval(trigger["metadata"]["query"])
    assert depth == 0
    auth = find(overlay, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "connection"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_reach_only_postgres_the_collector_dns_and_the_model_api(overlay: str) -> None:
    policy = find(overlay, "NetworkPolicy", "animus-engine")["spec"]
    assert policy["ingress"] == []
    ports = sorted(p["port"] for rule in policy["egress"] for p in rule["ports"])
    assert ports == [53, 53, 443, 4317, 5432]
    [outside] = [r for r in policy["egress"] if r["ports"][0]["port"] == 443]
    assert "10.0.0.0/8" in outside["to"][0]["ipBlock"]["except"]
