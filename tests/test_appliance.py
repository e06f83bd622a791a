"""The docker appliance, checked without Docker: no Docker engine runs where these tests run.

Everything that can be known from the files is checked here: both compose files, the
Dockerfile and every service's configuration parse; the services, ports, mounts, volumes,
health checks and dependencies are the ones the README's Appliance section describes; the
collector, Tempo, Loki, Prometheus and Grafana point at each other consistently; every PromQL
query of the dashboard names a metric animus really emits (derived from
``animus_core.infra.telemetry.METRICS`` by the collector's naming rule). Whether the images start
and accept these files is not known until ``docker compose up`` runs somewhere with Docker.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from animus_core.infra.telemetry import METRICS

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"

#: the README's Appliance section (and Postgres's usual 5432): service -> published ports.
SERVICES = {
    "animus": set(),
    "console": {8480},
    "postgres": {5432},
    "otel-collector": {4317, 4318},
    "tempo": {3200},
    "prometheus": {9090},
    "loki": {3100},
    "grafana": {3000},
}
OBSERVABILITY = {"otel-collector", "tempo", "prometheus", "loki", "grafana"}
#: Images with no shell or HTTP client to run a container health check with: Prometheus
#: scrapes them instead (their ``up`` series), which test_prometheus_scrapes_... checks.
NO_CONTAINER_HEALTHCHECK = {"otel-collector", "tempo"}
#: The collector's prometheus exporter setting the dashboard's names depend on.
TRANSLATION_STRATEGY = "UnderscoreEscapingWithSuffixes"


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")
    return data


@pytest.fixture(scope="module")
def observer() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(ROOT / "docker-compose.observer.yml")
    return data


def both(compose: dict[str, Any], observer: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "docker-compose.yml", compose
    yield "docker-compose.observer.yml", observer


_VAR = re.compile(r"\$\{(\w+)(:?-)([^}]*)\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR:-default}`` (unset or empty) and ``${VAR-default}`` (unset only)."""

    def sub(m: re.Match[str]) -> str:
        name, op, default = m.groups()
        if name not in env or (op == ":-" and env[name] == ""):
            return default
        return env[name]

    return _VAR.sub(sub, value)


def ports(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address it is published on (defaults interpolated)."""
    out = {}
    for entry in service.get("ports", []):
        host, published, target = str(entry).rsplit(":", 2)
        assert published == target, entry
        out[int(target)] = interpolate(host, {})
    return out


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        out.append((source, target))
    return out


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


# -- compose files ------------------------------------------------------------------------------


def test_compose_runs_exactly_the_eight_services_on_their_ports(compose):
    services = compose["services"]
    assert set(services) == set(SERVICES)
    for name, expected in SERVICES.items():
        assert set(ports(services[name])) == expected, name
        # published on this machine only unless ANIMUS_BIND says otherwise
        assert set(ports(services[name]).values()) <= {"127.0.0.1"}, name


def test_every_mounted_file_exists_and_every_named_volume_is_declared(compose, observer):
    for label, data in both(compose, observer):
        declared = set(data.get("volumes") or {})
        used = set()
        for name, service in data["services"].items():
            for source, target in mounts(service):
                assert target.startswith("/"), (label, name, target)
                if source.startswith((".", "/")):
                    assert (ROOT / source).exists(), f"{label}: {name} mounts {source}, missing"
                else:
                    assert source in declared, f"{label}: {name} uses undeclared volume {source}"
                    used.add(source)
        assert used == declared, f"{label}: declared but unused volumes {declared - used}"
        # every stateful service keeps its data in a named volume
        stateful = {"postgres": "/var/lib/postgresql/data", "tempo": "/var/tempo",
                    "prometheus": "/prometheus", "loki": "/loki", "grafana": "/var/lib/grafana"}
        for name, path in stateful.items():
            if name in data["services"]:
                assert (any(t == path and not s.startswith((".", "/"))
                            for s, t in mounts(data["services"][name]))), (label, name)


def test_health_checks(compose, observer):
    for label, data in both(compose, observer):
        for name, service in data["services"].items():
            check = service.get("healthcheck")
            if name == "animus":
                assert check is None  # the image's HEALTHCHECK: see test_dockerfile
                continue
            if name in NO_CONTAINER_HEALTHCHECK:
                assert check is None, f"{label}: {name}'s image cannot run a health check"
                continue
            assert check, f"{label}: {name} has no health check"
            test = check["test"]
            assert test[0] in ("CMD", "CMD-SHELL"), (label, name, test)
            assert len(test) > 1, (label, name, test)
            command = " ".join(test[1:])
            for port in SERVICES[name]:
                if name != "postgres":
                    assert f"localhost:{port}" in command, (label, name, command)


def test_prometheus_scrapes_the_services_without_a_container_health_check():
    targets = {t for job in load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    assert "otel-collector:8888" in targets  # the collector's own telemetry
    assert "tempo:3200" in targets
    collector = load_yaml(DOCKER / "otel-collector.yml")
    (reader,) = collector["service"]["telemetry"]["metrics"]["readers"]
    assert reader["pull"]["exporter"]["prometheus"]["port"] == 8888
    assert load_yaml(DOCKER / "tempo.yml")["server"]["http_listen_port"] == 3200


def test_the_core_starts_without_the_observability_services(compose):
    services = compose["services"]
    for name, service in services.items():
        assert set(depends_on(service)) <= set(services), name
    # `docker compose up animus postgres -d` starts the closure of depends_on
    closure, todo = set(), ["animus", "postgres"]
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(depends_on(services[name]))
    assert closure == {"animus", "postgres"}
    assert depends_on(services["animus"]) == {"postgres": "service_healthy"}


def test_backup_scripts_name_the_compose_services_and_volumes(compose):
    """scripts/backup.sh and restore.sh archive the observability volumes of these services."""
    for script in ("backup.sh", "restore.sh"):
        text = (ROOT / "scripts" / script).read_text()
        arrays = {m.group(1): m.group(2).split()
                  for m in re.finditer(r"^(SERVICES|VOLUMES)=\(([^)]*)\)", text, re.M)}
        services, volumes = arrays["SERVICES"], arrays["VOLUMES"]
        assert len(services) == len(volumes), script
        for service, volume in zip(services, volumes, strict=True):
            assert volume in compose["volumes"], (script, volume)
            assert volume in {s for s, _ in mounts(compose["services"][service])}, (script, service)
        assert set(services) == OBSERVABILITY - {"otel-collector"}, script  # the stateful ones
        assert "exec -T postgres" in text, script
        env = compose["services"]["postgres"]["environment"]
        assert {"POSTGRES_USER", "POSTGRES_DB"} <= set(env), script


def test_animus_environment_defaults(compose):
    env = compose["services"]["animus"]["environment"]
    # OTEL_ENDPOINT: the collector by default; set empty to turn telemetry off
    assert interpolate(env["OTEL_ENDPOINT"], {}) == "http://otel-collector:4317"
    assert interpolate(env["OTEL_ENDPOINT"], {"OTEL_ENDPOINT": ""}) == ""
    assert interpolate(env["OTEL_ENDPOINT"], {"OTEL_ENDPOINT": "http://observer-host:4317"}) \
        == "http://observer-host:4317"
    # DATABASE_URL names the compose Postgres with its user, password and database
    pg = compose["services"]["postgres"]["environment"]
    url = interpolate(env["DATABASE_URL"], {})
    password = interpolate(pg["POSTGRES_PASSWORD"], {})
    assert url == f"postgresql://{pg['POSTGRES_USER']}:{password}@postgres:5432/{pg['POSTGRES_DB']}"
    assert interpolate(env["LOG_LEVEL"], {}) == "info"
    assert "ANTHROPIC_API_KEY" in env
    # `animus up` drains for up to --grace (30 s) after SIGTERM: docker must wait longer
    grace = compose["services"]["animus"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > 30


def test_faculties_are_mounted_where_the_engine_looks_for_them(compose):
    dockerfile = (ROOT / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    faculties_env = re.search(r"ANIMUS_FACULTIES=(\S+)", dockerfile)
    assert workdir
    assert faculties_env
    mounted = dict((t, s) for s, t in mounts(compose["services"]["animus"]))
    assert mounted[faculties_env.group(1)] == "./faculties"
    # relative hook commands resolve against the engine's directory, the WORKDIR
    for toml in (ROOT / "faculties").glob("*.toml"):
        faculty = tomllib.loads(toml.read_text())["faculty"]
        for phase in ("orient", "engage", "consolidate", "recover"):
            command = faculty.get(phase, {}).get("command")
            if command and not command.startswith("/"):
                inside = Path(workdir.group(1)) / command.split()[0]
                assert inside.is_relative_to(faculties_env.group(1)), (toml.name, command)
                assert (ROOT / command.split()[0]).exists(), (toml.name, command)


def test_observer_is_the_observability_stack_alone(compose, observer):
    services = observer["services"]
    assert set(services) == OBSERVABILITY
    for name, service in services.items():
        mine = compose["services"][name]
        assert service["image"] == mine["image"], name
        assert mounts(service) == mounts(mine), name  # the same configuration files
        assert service.get("command") == mine.get("command"), name
        assert set(ports(service)) == SERVICES[name], name
        assert set(depends_on(service)) <= set(services), name
    # the fleet reaches the collector from other hosts
    assert set(ports(services["otel-collector"]).values()) == {"0.0.0.0"}


# -- service configurations ----------------------------------------------------------------------


def test_prometheus_keeps_30_days(compose, observer):
    for label, data in both(compose, observer):
        command = data["services"]["prometheus"]["command"]
        assert "--storage.tsdb.retention.time=30d" in command, label
        assert "--web.enable-remote-write-receiver" in command  # Tempo's metrics generator
        assert "--enable-feature=exemplar-storage" in command


def test_tempo_config():
    tempo = load_yaml(DOCKER / "tempo.yml")
    assert tempo["compactor"]["compaction"]["block_retention"] == "720h"
    grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(":4317")
    assert tempo["storage"]["trace"]["backend"] == "local"
    for path in (tempo["storage"]["trace"]["wal"]["path"], tempo["storage"]["trace"]["local"]["path"],
                 tempo["metrics_generator"]["storage"]["path"]):
        assert path.startswith("/var/tempo/"), path  # on the tempo-data volume
    (rw,) = tempo["metrics_generator"]["storage"]["remote_write"]
    assert rw["url"] == "http://prometheus:9090/api/v1/write"


def test_loki_config():
    loki = load_yaml(DOCKER / "loki.yml")
    assert loki["limits_config"]["retention_period"] == "720h"
    assert loki["compactor"]["retention_enabled"] is True
    assert loki["compactor"]["delete_request_store"] == "filesystem"  # required for retention
    assert loki["limits_config"]["allow_structured_metadata"] is True  # OTLP trace_id
    assert loki["server"]["http_listen_port"] == 3100
    assert loki["common"]["path_prefix"] == "/loki"  # on the loki-data volume
    (schema,) = loki["schema_config"]["configs"]
    assert (schema["store"], schema["schema"]) == ("tsdb", "v13")


def test_collector_routes_each_signal_to_its_backend():
    otel = load_yaml(DOCKER / "otel-collector.yml")
    protocols = otel["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    pipelines = otel["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    for pipeline in pipelines.values():
        assert pipeline["receivers"] == ["otlp"]
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in otel[kind], f"{component} is not defined under {kind}"
    for ext in otel["service"].get("extensions", []):
        assert ext in otel["extensions"]
    exporters = otel["exporters"]
    (traces,) = pipelines["traces"]["exporters"]
    assert traces.split("/")[0] == "otlp"
    assert exporters[traces]["endpoint"] == "tempo:4317"
    (logs,) = pipelines["logs"]["exporters"]
    assert logs.split("/")[0] == "otlphttp"
    assert exporters[logs]["endpoint"] == "http://loki:3100/otlp"
    (metrics,) = pipelines["metrics"]["exporters"]
    assert metrics == "prometheus"
    prom = exporters["prometheus"]
    assert prom["translation_strategy"] == TRANSLATION_STRATEGY
    assert prom["enable_open_metrics"] is True  # exemplars
    # Prometheus scrapes that endpoint, keeping the job/instance the exporter sets
    port = prom["endpoint"].rsplit(":", 1)[1]
    jobs = [j for j in load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
            if f"otel-collector:{port}" in j["static_configs"][0]["targets"]]
    assert len(jobs) == 1
    assert jobs[0]["honor_labels"] is True


def test_prometheus_config():
    prom = load_yaml(DOCKER / "prometheus.yml")
    # classic (underscore) names, whatever the scrape negotiates
    assert prom["global"]["metric_name_validation_scheme"] == "legacy"
    names = [j["job_name"] for j in prom["scrape_configs"]]
    assert len(names) == len(set(names))


# -- Grafana ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    data = load_yaml(DOCKER / "grafana/provisioning/datasources/datasources.yml")
    return {d["uid"]: d for d in data["datasources"]}


def test_grafana_datasources_are_cross_linked(datasources):
    assert {uid: d["type"] for uid, d in datasources.items()} == {
        "prometheus": "prometheus", "tempo": "tempo", "loki": "loki"}
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    assert datasources["tempo"]["url"] == "http://tempo:3200"
    assert datasources["loki"]["url"] == "http://loki:3100"
    # metrics -> traces: exemplars carry trace_id
    (exemplar,) = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert exemplar == {"name": "trace_id", "datasourceUid": "tempo"}
    # traces -> logs: Loki keeps OTLP trace ids as the trace_id structured metadata
    to_logs = datasources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == "loki"
    assert "trace_id=" in to_logs["query"].replace(" ", "")
    assert "$${__trace.traceId}" in to_logs["query"]  # "$$": not an environment variable
    assert datasources["tempo"]["jsonData"]["serviceMap"]["datasourceUid"] == "prometheus"
    # logs -> traces
    (derived,) = datasources["loki"]["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == "tempo"
    assert (derived["matcherType"], derived["matcherRegex"]) == ("label", "trace_id")
    assert derived["url"] == "$${__value.raw}"


def test_grafana_provisions_the_dashboard_with_anonymous_admin_access(compose):
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Admin"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    mounted = {t: s for s, t in mounts(grafana)}
    assert mounted["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    (provider,) = load_yaml(DOCKER / "grafana/provisioning/dashboards/dashboards.yml")["providers"]
    inside = provider["options"]["path"]
    assert mounted[inside] == "./docker/grafana/dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(inside + "/")
    assert (ROOT / "docker/grafana/dashboards" / home.removeprefix(inside + "/")).is_file()


def prometheus_names(name: str, kind: str, unit: str) -> set[str]:
    """The Prometheus series names of one OpenTelemetry metric under the collector's
    ``UnderscoreEscapingWithSuffixes``: dots (any character outside [a-zA-Z0-9_:]) become
    underscores; unit ``s`` adds ``_seconds`` (``{...}`` units are annotations and add
    nothing); counters add ``_total``; histograms are ``_bucket``, ``_sum`` and ``_count``."""
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    suffix = {"s": "seconds"}.get(unit, "")
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    if kind == "counter":
        return {base + "_total"}
    if kind == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


EMITTED = set().union(*(prometheus_names(n, *spec[:2]) for n, spec in METRICS.items()))

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                 "or", "unless", "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_the_name_rule_knows_every_unit_animus_uses():
    for name, (kind, unit, _) in METRICS.items():
        assert kind in ("counter", "histogram", "gauge"), name
        assert unit == "s" or re.fullmatch(r"\{[a-z_]+\}", unit), (
            f"{name}: unit {unit!r}: teach prometheus_names its Prometheus suffix")
    assert prometheus_names("animus.focus.duration", "histogram", "s") == {
        "animus_focus_duration_seconds_bucket", "animus_focus_duration_seconds_sum",
        "animus_focus_duration_seconds_count"}
    assert prometheus_names("animus.work.submitted", "counter", "{item}") == {
        "animus_work_submitted_total"}
    assert prometheus_names("animus.queue.depth", "gauge", "{message}") == {"animus_queue_depth"}


def test_promql_metrics_finds_metric_names_only():
    assert promql_metrics(
        'histogram_quantile(0.95, sum by (le, faculty) (rate(a_b_bucket{x=~"$i", y="c d"}'
        '[$__rate_interval]))) * 60 + on(job) group_left(z) up offset 5m') == {"a_b_bucket", "up"}
    assert promql_metrics("sum(rate(x_total[5m])) / ignoring(q) sum(y)") == {"x_total", "y"}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, datasource uid, query) of every panel target and query variable."""
    dash = json.loads((DOCKER / "grafana/dashboards/animus-work.json").read_text())
    out: list[tuple[str, str, str]] = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            uid = str((target.get("datasource") or panel.get("datasource") or {}).get("uid"))
            out.append((panel["title"], uid,
                        str(target.get("expr") or target.get("query") or "")))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", var["datasource"]["uid"], query))
    return out


def test_dashboard_queries_name_only_metrics_animus_emits(datasources):
    queries = dashboard_queries()
    assert queries
    used: set[str] = set()
    for title, uid, query in queries:
        assert uid in datasources, f"{title}: unknown data source {uid}"
        assert query.strip(), title
        if datasources[uid]["type"] != "prometheus":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        names = {m.group(1)} if m else promql_metrics(query)
        assert names, f"{title}: no metric in {query!r}"
        unknown = names - EMITTED
        assert not unknown, (f"{title}: {sorted(unknown)} is not emitted by animus "
                             f"(telemetry.METRICS gives {sorted(EMITTED)})")
        used |= names
    # the work-queue dashboard covers throughput, depth, failures, latency and tokens
    assert {"animus_work_transitions_total", "animus_queue_depth", "animus_hook_failures_total",
            "animus_focus_duration_seconds_bucket", "gen_ai_client_token_usage_sum"} <= used
    # and its label filters use labels animus's metrics carry
    text = " ".join(q for _, _, q in queries)
    for label in re.findall(r"sum by \(([^)]*)\)", text):
        for name in (x.strip() for x in label.split(",")):
            assert name in {"le", "to", "queue", "faculty", "phase", "reason", "work_type",
                            "gen_ai_token_type", "gen_ai_request_model"}, name


def test_dashboard_log_and_trace_panels_query_animus():
    for title, uid, query in dashboard_queries():
        if uid == "loki":
            assert query.startswith('{service_name="animus"}'), title
        if uid == "tempo":
            assert 'resource.service.name = "animus"' in query, title


# -- the image ----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile():
    instructions = dockerfile_instructions()
    ops = [op for op, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for op, rest in instructions:
        if op == "COPY":
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
                top = source.split("/")[0]
                assert top not in ignored, f"{source} is excluded by .dockerignore"
    run = " ".join(rest for op, rest in instructions if op == "RUN")
    install = re.search(r"pip install (.*)", run)
    assert install, "the Dockerfile does not pip install animus"
    assert "./plugins/*/" in install.group(1).split()  # every first-party faculty package
    # animus itself, with extras that exist (pip only warns about unknown ones)
    (me,) = [a.strip('"') for a in install.group(1).split() if a.strip('"').startswith(".[")
             or a == "."]
    extras = set(re.findall(r"\w+", me.removeprefix(".")))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras <= set(pyproject.get("optional-dependencies", {})), extras
    # a non-root user runs the engine
    users = [rest for op, rest in instructions if op == "USER"]
    assert users
    assert users[-1] not in ("root", "0")
    assert ops.index("USER") < ops.index("CMD")
    (health,) = [rest for op, rest in instructions if op == "HEALTHCHECK"]
    assert "docker/healthcheck.py" in health
    assert instructions[-1] == ("CMD", '["animus", "up"]')


async def test_the_image_health_check_sees_the_engine_listener(db_url):
    """docker/healthcheck.py fails with no engine listening and passes with one."""
    script = ROOT / "docker" / "healthcheck.py"
    env = {**os.environ, "DATABASE_URL": db_url}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=30, check=False)

    result = check()
    assert result.returncode == 1, result
    assert "no engine listener" in result.stderr
    listener = await asyncpg.connect(db_url, server_settings={"application_name": "animus-listener"})
    try:
        result = check()
        assert result.returncode == 0, result.stderr
    finally:
        await listener.close()


# -- the README ---------------------------------------------------------------------------------------


def readme_appliance() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Appliance\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no '## Appliance' section"
    return m.group(1)


def test_readme_lists_the_services_and_ports_of_the_compose_file(compose):
    section = readme_appliance()
    rows = re.findall(r"^\| *([a-z-]+) *\| *([^|]*?) *\|", section, re.M)
    table = {name: {int(p) for p in re.findall(r"\d+", ports_text)}
             for name, ports_text in rows if name not in ("service", "---")}
    assert table == {name: set(ports(s)) for name, s in compose["services"].items()}
    flat = " ".join(section.split()).replace("eight services", "8 services")
    assert f"{len(compose['services'])} services" in flat


def test_readme_says_how_the_appliance_was_verified(compose):
    section = " ".join(readme_appliance().split())
    for needed in ("docker compose up animus postgres -d", "docker-compose.observer.yml",
                   "OTEL_ENDPOINT=http://observer-host:4317", "tests/test_appliance.py",
                   "tests/test_telemetry.py", "not started", "no Docker engine", "30 days"):
        assert needed in section, needed
    for config in ("otel-collector.yml", "tempo.yml", "loki.yml", "prometheus.yml",
                   "animus-work.json"):
        assert config in section, config
