"""deploy/ checked without Docker or a cluster: every YAML and JSON file parses, the
compose file and the Kubernetes manifests hold their essential settings and name only
settings the service knows, the Dockerfile builds in two stages and runs as a non-root
user, and the Grafana dashboard and Prometheus alerts ask only for metrics (and label
values) that a real running service exports."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from issuer import metrics
from issuer.config import CONFIG_FILE, ENV
from issuer.server import WORKER_STOP_TIMEOUT_S
from tests.conftest import ROOT, Service, unique_id
from tests.money import issue, new_merchant, payment, redeem, refund
from tests.people import campaign, claim, iso
from tests.prometheus import load, promtool_passes, rules_files

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "issuer.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
NGINX = DEPLOY / "nginx" / "nginx.conf"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"

KNOWN_SETTINGS = set(ENV) | {CONFIG_FILE}
SETTING = re.compile(r"\b(?:ISSUER_[A-Z0-9_]+|REDIS_URL|DATABASE_URL)\b")
METRIC = re.compile(r"\bissuer_[a-z0-9_]*[a-z0-9]")
SUFFIX = re.compile(r"_(?:bucket|sum|count)$")
# a selector's braces may hold quoted braces: route="/v1/campaigns/{campaign_id}/claims"
SELECTOR = re.compile(r'\b(issuer_[a-z0-9_]*[a-z0-9])\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
# Exported only by a supervisor that started the embedded Valkey/PostgreSQL itself; the
# test service is given REDIS_URL and DATABASE_URL, so a scrape cannot show it.
EMBEDDED_ONLY = "issuer_embedded_server_up"


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


# ------------------------------------------------------------------ every file parses


@pytest.mark.fast
def test_every_yaml_and_json_file_parses() -> None:
    yaml_files = deploy_files(".yml", ".yaml")
    json_files = deploy_files(".json")
    assert {COMPOSE, ALERTS, PROMETHEUS, K8S / "kustomization.yaml"} <= set(yaml_files)
    assert DASHBOARD in json_files
    for path in yaml_files:
        assert yaml_docs(path), f"{path} holds no YAML document"
    for path in json_files:
        assert isinstance(json.loads(path.read_text()), dict), path


# ------------------------------------------------------------------ settings


def env_names(env: Any) -> set[str]:
    """Names of a compose `environment` (mapping or list of NAME=value)."""
    if isinstance(env, dict):
        return set(env)
    return {item.split("=", 1)[0] for item in env or []}


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += yaml_docs(K8S / name)
    return docs


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def config_map() -> dict[str, str]:
    data: dict[str, str] = k8s_named("ConfigMap", "issuer-config")["data"]
    return data


def containers() -> Iterator[dict[str, Any]]:
    for doc in k8s_docs():
        if doc["kind"] == "Deployment":
            yield from doc["spec"]["template"]["spec"]["containers"]


@pytest.mark.fast
def test_compose_and_kubernetes_name_only_settings_the_service_knows() -> None:
    in_compose = set()
    for service in compose()["services"].values():
        in_compose |= env_names(service.get("environment"))
    in_k8s = set(config_map())
    for container in containers():
        in_k8s |= {e["name"] for e in container.get("env", [])}
    core = {"REDIS_URL", "DATABASE_URL", "ISSUER_PERSON_KEY", "ISSUER_KEYS_FILE"}
    assert core | {"ISSUER_RUN_FLUSHER", "ISSUER_WORKERS"} <= in_compose
    assert core | {"ISSUER_RUN_FLUSHER", "ISSUER_DATA_DIR", "ISSUER_SHUTDOWN_GRACE_S"} <= in_k8s
    # Any mention at all, in a manifest, a comment, the Dockerfile or a README, counts.
    mentioned: dict[str, Path] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in SETTING.findall(path.read_text()):
                mentioned.setdefault(name, path.relative_to(ROOT))
    named = {n for n in in_compose | in_k8s if SETTING.fullmatch(n)} | set(mentioned)
    unknown = {n: str(mentioned.get(n, "an environment")) for n in named - KNOWN_SETTINGS}
    assert not unknown, f"settings issuer/config.py does not know: {unknown}"


# ------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instruction, _, args = (current + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continuation"
    return out


@pytest.mark.fast
def test_dockerfile_builds_a_wheel_and_runs_it_as_a_non_root_user() -> None:
    instructions = dockerfile()
    args = {}
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []  # name, base, instructions
    for instruction, rest in instructions:
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            base, _, name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).partition(
                " AS "
            )
            stages.append((name.strip(), base.strip(), []))
        else:
            stages[-1][2].append((instruction, rest))
    assert len(stages) >= 2
    by_name = {name: (base, body) for name, base, body in stages}
    builder_base, builder = by_name["builder"]
    assert builder_base.startswith("python:3.11")
    # a venv of the base's own python3, filled from the wheelhouse only (no index)
    assert any(i == "RUN" and "python3 -m venv /opt/venv" in a for i, a in builder)
    assert any(i == "RUN" and "--no-index --find-links /wheels" in a for i, a in builder)

    name, base, runtime = stages[-1]  # the default target
    assert name == "runtime"
    while base in by_name:  # the image it finally stands on
        base = by_name[base][0]
    assert base.startswith("python:3.11-slim"), base
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("EXPOSE", "8080") in runtime
    (healthcheck,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert ("ENTRYPOINT", '["issuer"]') in runtime
    assert ("CMD", '["serve", "--host", "0.0.0.0"]') in runtime
    # the builder copies only the wheelhouse (deploy/wheelhouse.sh's directory), and
    # .dockerignore keeps everything else out of the build context
    copied = [rest for i, rest in builder if i == "COPY" and not rest.startswith("--from")]
    assert copied == ["wheels /wheels"]
    assert "${1:-wheels}" in (DEPLOY / "wheelhouse.sh").read_text()
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns == ["*", "!wheels"]


# ------------------------------------------------------------------ docker compose


@pytest.mark.fast
def test_compose_services_and_their_essentials() -> None:
    services = compose()["services"]
    wanted = {"valkey", "postgres", "issuer", "flusher", "nginx", "prometheus", "grafana"}
    assert wanted | {"locust-master", "locust-worker"} <= set(services)

    valkey = services["valkey"]
    assert valkey["image"] == "valkey/valkey:8"
    command = " ".join(valkey["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(v.endswith(":/data") for v in valkey["volumes"])

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16" and postgres["healthcheck"]["test"]
    assert any("/var/lib/postgresql/data" in v for v in postgres["volumes"])

    issuer = services["issuer"]
    assert issuer["deploy"]["replicas"] == 2
    build = issuer["build"]
    assert build["context"] == ".."
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    env = issuer["environment"]
    assert env["ISSUER_RUN_FLUSHER"] == "false" and env["ISSUER_WORKERS"] == "2"
    assert env["REDIS_URL"].startswith("redis://valkey:")
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["DATABASE_URL"]
    assert env["ISSUER_PERSON_KEY"].startswith("${")  # from deploy/.env, never in the file
    keys_secret = compose()["secrets"][issuer["secrets"][0]]
    assert env["ISSUER_KEYS_FILE"] == f"/run/secrets/{issuer['secrets'][0]}" and keys_secret
    assert issuer.get("stop_grace_period")

    flusher = services["flusher"]
    assert flusher["command"] == ["flush"] and flusher["image"] == issuer["image"]
    assert {"REDIS_URL", "DATABASE_URL"} <= set(flusher["environment"])

    # published ports only on loopback
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # every bind-mounted file or directory of the repository exists
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), volume


@pytest.mark.fast
def test_nginx_proxies_to_the_replicas_with_keepalive_and_request_ids() -> None:
    (mount,) = compose()["services"]["nginx"]["volumes"]
    assert (COMPOSE.parent / mount.split(":")[0]).resolve() == NGINX
    conf = NGINX.read_text()
    assert re.search(r"upstream issuer \{[^}]*server issuer:8080[^}]*keepalive \d+;", conf)
    assert "proxy_pass http://issuer;" in conf
    assert 'proxy_set_header Connection "";' in conf and "proxy_http_version 1.1;" in conf
    assert re.search(r"proxy_set_header X-Request-Id \$\w+;", conf)
    assert conf.count("{") == conf.count("}")


@pytest.mark.fast
def test_prometheus_scrapes_the_replicas_and_loads_the_alerts() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert "alerts.yml" in config["rule_files"]  # and every other rules file: test_prometheus
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "issuer"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["issuer"]
    assert job["dns_sd_configs"][0]["port"] == 8080
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in mounts


@pytest.mark.fast
def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    grafana = DEPLOY / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((grafana / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((grafana / "dashboards" / "issuer.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    # the provider's directory is where compose mounts deploy/grafana/issuer.json
    assert mounts["./grafana/issuer.json"] == provider["options"]["path"] + "/issuer.json"


@pytest.mark.fast
def test_locust_runs_the_repository_locustfile_with_its_flags() -> None:
    services = compose()["services"]
    defined = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', LOCUSTFILE.read_text()))
    locust_own = {"-f", "--master", "--worker", "--headless", "--expect-workers", "-H"}
    locust_own |= {"--master-host"}
    needed = {"--keys-file", "--campaign", "--future-campaign", "--opens-at"}
    needed |= {"--surge-users", "--surge-s"}
    for name in ("locust-master", "locust-worker"):
        command = services[name]["command"]
        assert command[:2] == ["-f", "/mnt/loadtest/locustfile.py"]
        flags = {a for a in command if a.startswith("-")}
        assert needed <= flags, name
        assert flags <= defined | locust_own, flags - defined - locust_own
        assert "../loadtest:/mnt/loadtest:ro" in services[name]["volumes"]
        assert services[name]["build"]["target"] == "loadtest"
    assert "--master" in services["locust-master"]["command"]
    worker = services["locust-worker"]["command"]
    assert worker[worker.index("--master-host") + 1] == "locust-master"


# ------------------------------------------------------------------ Kubernetes


@pytest.mark.fast
def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert {
        ("Deployment", "issuer"),
        ("Deployment", "issuer-flusher"),
        ("HorizontalPodAutoscaler", "issuer"),
        ("Service", "issuer"),
        ("PodDisruptionBudget", "issuer"),
        ("ConfigMap", "issuer-config"),
    } <= kinds
    external = (K8S / "EXTERNAL.md").read_text()
    assert "Redis Cluster" in external and "Sentinel" in external and "PostgreSQL" in external


@pytest.mark.fast
def test_issuer_deployment_probes_shutdown_and_security() -> None:
    deployment = k8s_named("Deployment", "issuer")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz?scope=gate"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]

    settings = config_map()
    assert settings["ISSUER_RUN_FLUSHER"] == "false"
    grace = float(settings["ISSUER_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace + WORKER_STOP_TIMEOUT_S
    assert pod["enableServiceLinks"] is False  # a Service named issuer injects ISSUER_* vars

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"] == int(settings["ISSUER_PORT"])
    assert annotations["prometheus.io/path"] == "/metrics"

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts[settings["ISSUER_DATA_DIR"]]
    keys_file = Path(settings["ISSUER_KEYS_FILE"])
    keys_volume = mounts[str(keys_file.parent)]["secret"]
    assert keys_file.name in [item["path"] for item in keys_volume["items"]]
    assert "persistentVolumeClaim" in mounts[settings["ISSUER_DOCUMENTS_DIR"]]
    secret_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(secret_env) == {"REDIS_URL", "DATABASE_URL", "ISSUER_PERSON_KEY"}
    assert not {"REDIS_URL", "DATABASE_URL", "ISSUER_PERSON_KEY"} & set(settings)


@pytest.mark.fast
def test_service_hpa_pdb_and_flusher() -> None:
    labels = k8s_named("Deployment", "issuer")["spec"]["template"]["metadata"]["labels"]
    service = k8s_named("Service", "issuer")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    pdb = k8s_named("PodDisruptionBudget", "issuer")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s_named("HorizontalPodAutoscaler", "issuer")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "issuer",
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]

    flusher = k8s_named("Deployment", "issuer-flusher")
    flusher_labels = flusher["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= flusher_labels.items()
    (container,) = flusher["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["flush"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.keys() == {"REDIS_URL", "DATABASE_URL", "ISSUER_HOST", "ISSUER_METRICS_PORT"}
    port = flusher["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    assert env["ISSUER_METRICS_PORT"] == port == str(container["ports"][0]["containerPort"])
    assert flusher["spec"]["replicas"] >= 1


# ------------------------------------------------------------------ PromQL vs /metrics


def dashboard_queries() -> list[str]:
    """Every PromQL text of the dashboard: panel targets and templating queries."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    dashboard = json.loads(DASHBOARD.read_text())
    walk(dashboard["panels"])
    walk(dashboard["templating"])
    return found


def alert_queries() -> list[str]:
    """The expression of every alert of every rules file under deploy/prometheus/."""
    rules = [r for path in rules_files() for g in load(path)["groups"] for r in g["rules"]]
    assert all("alert" in r and "expr" in r for r in rules)
    return [str(r["expr"]) for r in rules]


@pytest.mark.fast
def test_dashboard_and_alerts_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["campaign"]["definition"] == (
        "label_values(issuer_campaign_ledger_fen, campaign)"
    )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("claims/s", "latency", "ledger", "quota", "round", "flusher lag"):
        assert wanted in titles, wanted
    for text in dashboard_queries() + alert_queries():
        for opening, closing in ("()", "{}", "[]"):
            assert text.count(opening) == text.count(closing), text
        assert text.count('"') % 2 == 0, text
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert len(names) >= 8


def scraped_series(text: str) -> dict[str, list[dict[str, str]]]:
    """Metric name (histogram suffixes stripped) -> label sets of its samples."""
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(SUFFIX.sub("", sample.name), []).append(dict(sample.labels))
    return series


async def exercise(service: Service) -> str:
    """A campaign whose vouchers expire in seconds and one with a round budget, a claim,
    a redemption, a refund and an expiry, so that every labeled series exists; returns
    the campaign whose voucher was redeemed."""
    body = campaign(round_budget_fen=10**8)
    campaign_id = unique_id()
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", body)).status == 201
    merchant_id = await new_merchant(service)
    voucher = await issue(service, campaign_id, 1)
    redeemed = await redeem(service, payment(voucher, merchant_id, 500_000))
    assert redeemed.status == 201, redeemed.body
    refunded = await refund(service, redeemed.body["redemption_id"], 100_000, "refund-deploy-1")
    assert refunded.status == 201, refunded.body

    now = datetime.now(UTC)
    short = campaign()
    short["rounds"][0].update(
        closes_at=iso(now + timedelta(seconds=8)), valid_until=iso(now + timedelta(seconds=9))
    )
    expiring = unique_id()
    assert (await service.call("PUT", f"/v1/campaigns/{expiring}", short)).status == 201
    resp = await service.call(
        "POST", f"/v1/campaigns/{expiring}/claims", claim(2, request_id="claim-expiring"), "app"
    )
    assert resp.status == 201, resp.body
    return campaign_id


async def scrape_until(service: Service, names: set[str], within_s: float = 30) -> str:
    """/metrics once every name in `names` has a sample (the sweeper runs once a second)."""
    async with asyncio.timeout(within_s):
        while True:
            async with service.session.get(service.url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            if names <= set(scraped_series(text)):
                return text
            await asyncio.sleep(0.25)


@pytest.fixture(scope="module")
async def exported(service: Service) -> str:
    """/metrics of the service once it has claimed, redeemed, refunded and expired."""
    await exercise(service)
    await service.drained()
    return await scrape_until(service, {"issuer_vouchers_expired_total", "issuer_refunds_total"})


async def test_dashboard_and_alerts_ask_only_for_exported_metrics(exported: str) -> None:
    queries = dashboard_queries() + alert_queries()
    wanted = {SUFFIX.sub("", name) for text in queries for name in METRIC.findall(text)}
    assert {"issuer_claims_total", "issuer_request_seconds", "issuer_backend_up"} <= wanted
    series = scraped_series(exported)

    # issuer_embedded_server_up: see EMBEDDED_ONLY; the metric must exist in issuer.metrics.
    assert [m.name for m in metrics.EMBEDDED_UP.describe()] == [EMBEDDED_ONLY]
    assert metrics.EMBEDDED_UP._labelnames == ("server",)
    missing = wanted - set(series) - {EMBEDDED_ONLY}
    assert not missing, f"the dashboard or the alerts want metrics nobody exports: {missing}"

    # Label names in selectors exist on the series, and exact label values are ones seen
    # (the route of claims, account="available", backend="redis", ...).
    for query in queries:
        for name, matchers in SELECTOR.findall(query):
            name = SUFFIX.sub("", name)
            if name == EMBEDDED_ONLY:
                assert {m[0] for m in MATCHER.findall(matchers)} <= {"server"}
                continue
            for label, op, wanted_value in MATCHER.findall(matchers):
                values = {labels.get(label) for labels in series[name]} - {None}
                assert values, f"{name} has no label {label} ({query})"
                if op == "=" and "$" not in wanted_value:
                    assert wanted_value in values, f"{name}{{{label}={wanted_value!r}}}: {values}"


# ------------------------------------------------------------------ promtool check metrics


async def test_live_metrics_pass_promtool_check_metrics(exported: str, promtool: str) -> None:
    """Prometheus' own lint (names, units, help, types) on every family a running service
    exports, each with samples (promtool skips a family without)."""
    families = {f.name: f for f in text_string_to_metric_families(exported)}
    assert not [name for name, f in families.items() if not f.samples]
    defined = {f.name for f in REGISTRY.collect() if f.name.startswith("issuer_")}
    assert defined - {EMBEDDED_ONLY} <= set(families)
    assert "issuer_due_date_provisional_soonest_seconds" in families  # read at scrape time
    assert promtool_passes(promtool, "check", "metrics", stdin=exported) == ""


def test_the_embedded_servers_gauge_passes_promtool_check_metrics(promtool: str) -> None:
    """The family only a supervisor that started Valkey/PostgreSQL itself exports (see
    EMBEDDED_ONLY), linted from its definition."""
    registry = CollectorRegistry()
    registry.register(metrics.EMBEDDED_UP)
    metrics.EMBEDDED_UP.labels("valkey").set(1)
    try:
        text = generate_latest(registry).decode()
    finally:
        metrics.EMBEDDED_UP.remove("valkey")
    assert f'{EMBEDDED_ONLY}{{server="valkey"}} 1.0' in text
    assert promtool_passes(promtool, "check", "metrics", stdin=text) == ""
