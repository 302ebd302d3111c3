"""The deploy files agree with the service and with each other.

Fast and tool-free (json, PyYAML and the service's own metric registry); scripts/check_deploy.sh does the
slow checks with the real tools (promtool, kubectl kustomize, kubernetes-validate, podman).
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from service.core.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vae-service.json"
ALERTS = DEPLOY / "prometheus" / "rules" / "vae-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "tests" / "vae-alerts.test.yml"
K8S_BASE = DEPLOY / "k8s" / "base"

# Labels Prometheus adds to every scraped series, and the bucket label of histograms.
TARGET_LABELS = {"job", "instance"}
# PromQL words that look like metric names in a regex scan.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "histogram_quantile",
    "or", "and", "unless", "on", "ignoring", "group_left", "group_right", "avg_over_time", "max_over_time",
    "min_over_time", "absent", "bool", "topk", "bottomk", "clamp_min", "clamp_max", "le", "offset",
}


# The metrics contract of service/core/metrics.py that the dashboard and the alert rules are written against:
# family -> (type, label names). test_service_exports_the_metric_contract holds the service to it.
METRIC_CONTRACT = {
    "vae_requests": ("counter", {"endpoint", "status", "role"}),
    "vae_request_duration_seconds": ("histogram", {"endpoint", "status", "role"}),
    "vae_queue_depth": ("gauge", {"kernel"}),
    "vae_queue_capacity": ("gauge", {"kernel"}),
    "vae_queue_wait_seconds": ("histogram", {"kernel"}),
    "vae_batch_rows": ("histogram", {"kernel"}),
    "vae_model_seconds": ("histogram", {"kernel"}),
    "vae_rejections": ("counter", {"reason"}),
    "vae_ready": ("gauge", set()),
    "vae_process_ready": ("gauge", set()),  # with several server processes, a pid label per process
    "vae_model_info": ("gauge", {"version", "sha256", "device"}),
    "vae_process_model": ("gauge", {"sha256"}),  # and a pid label per process
    "vae_reloads": ("counter", {"outcome"}),
    "vae_gpu_memory_bytes": ("gauge", {"device", "kind"}),
}


def exported_series() -> dict:
    """Series name as PromQL sees it (counter _total, histogram _bucket/_sum/_count) -> its label names."""
    series = {}
    for family, (kind, labels) in METRIC_CONTRACT.items():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
        for suffix in suffixes:
            series[family + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


SERIES = exported_series()


def metric_names(expr: str) -> set:
    """Names of the series an expression reads (identifiers that are not PromQL words, label names or values)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_clauses = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_matchers)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_clauses)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", without_ranges))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d.*|e\d*", n)}


def labels_used(expr: str) -> set:
    """Label names in selectors {a="..."} and in by/without/on/ignoring clauses."""
    used = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", re.sub(r'"[^"]*"', '""', matchers)))
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in clause.split(",") if label.strip()}
    return used


def check_expr(expr: str) -> None:
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    unknown = names - set(SERIES) - {"up"}
    assert not unknown, f"{sorted(unknown)} are not exported by the service (expression {expr!r})"
    available = set().union(*(SERIES.get(n, set()) for n in names)) | TARGET_LABELS
    missing = labels_used(expr) - available
    assert not missing, f"labels {sorted(missing)} are on none of {sorted(names)} (expression {expr!r})"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ------------------------------------------------------------------------------------------------ helpers


def test_service_exports_the_metric_contract():
    metrics = Metrics()
    families = {f.name: f.type for f in metrics.registry.collect()}
    assert families == {name: kind for name, (kind, _) in METRIC_CONTRACT.items()}
    for collector in vars(metrics).values():
        describe = getattr(collector, "describe", None)
        if describe is None or not hasattr(collector, "labels"):
            continue
        name = describe()[0].name
        labels = METRIC_CONTRACT[name][1]
        if labels:
            collector.labels(**dict.fromkeys(labels, "x"))  # ValueError when the label names differ


def test_expression_checker_catches_unknown_metrics_and_labels():
    check_expr('sum by (endpoint) (rate(vae_requests_total{job=~".*", status="500"}[5m]))')
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("rate(vae_request_total[5m])")
    with pytest.raises(AssertionError, match="labels"):
        check_expr("sum by (kernel) (rate(vae_requests_total[5m]))")


# --------------------------------------------------------------------------------------------- dashboard


def dashboard_targets():
    dashboard = json.loads(DASHBOARD.read_text())
    return dashboard, [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_use_exported_metrics_and_labels():
    _, targets = dashboard_targets()
    assert len(targets) >= 10
    for title, expr in targets:
        filled = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        try:
            check_expr(filled)
        except AssertionError as exc:
            raise AssertionError(f"panel {title!r}: {exc}") from None


def test_dashboard_covers_what_operators_watch():
    _, targets = dashboard_targets()
    exprs = "\n".join(expr for _, expr in targets)
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({quantile}, sum by \(endpoint, le\) \(rate\(vae_request_duration_seconds_bucket",
                         exprs), f"no p{quantile} latency per endpoint"
    for needed in ("vae_requests_total", 'status=~"4..|5.."', "vae_rejections_total", "vae_batch_rows",
                   "vae_queue_depth", "vae_gpu_memory_bytes", "vae_ready"):
        assert needed in exprs, f"the dashboard shows nothing of {needed}"


def test_dashboard_layout_and_datasource():
    dashboard, _ = dashboard_targets()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} overflows the 24-column grid"
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], f"panel {panel['title']!r} has no query"
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert provisioned["datasources"][0]["uid"] == variables["datasource"]["current"]["value"]


# ----------------------------------------------------------------------------------------------- alerts

ALERT_NAMES = {"VAEHighP99Latency", "VAEHighErrorRate", "VAERejectingWork", "VAEQueueSaturated", "VAEInstanceNotReady"}


def alert_rules():
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_read_exported_metrics_and_labels():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for rule in rules:
        check_expr(rule["expr"])
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_every_alert_has_a_promtool_test_that_fires_it():
    fired = set()
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
    assert fired == ALERT_NAMES


def test_k8s_prometheusrule_is_the_alert_file():
    rule = load_yaml(K8S_BASE / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == load_yaml(ALERTS), "deploy/k8s/base/prometheusrule.yaml drifted from the alert rules"


def test_prometheus_scrapes_the_compose_service_and_loads_the_rules():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "vae-service")
    compose = load_yaml(DEPLOY / "compose.yaml")
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in compose["services"] and port == "8000"
    assert ALERTS.name in [p.name for pattern in config["rule_files"] for p in (DEPLOY / "prometheus").glob(pattern)]
    # The "instance down" half of VAEInstanceNotReady names this job.
    assert f'up{{job="{job["job_name"]}"}}' in ALERTS.read_text()


# ---------------------------------------------------------------------------------------------- compose


def test_compose_wires_service_prometheus_and_grafana():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"vae", "prometheus", "grafana"} <= set(services)
    vae = services["vae"]
    assert (DEPLOY / vae["build"]["context"] / vae["build"].get("dockerfile", "Dockerfile")).is_file()
    assert vae["read_only"] is True and any(t.startswith("/tmp") for t in vae["tmpfs"])
    grace = int(vae["environment"]["VAE_GRACE_PERIOD_S"])
    assert int(vae["stop_grace_period"].rstrip("s")) > grace, "compose would kill the service mid-drain"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "vae.yaml")["providers"][0]
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro") for v in services["grafana"]["volumes"])


# ------------------------------------------------------------------------------------------- kubernetes


def base_objects() -> dict:
    kustomization = load_yaml(K8S_BASE / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        path = K8S_BASE / resource
        assert path.is_file(), f"kustomization lists missing {resource}"
        for doc in load_yaml_all(path):
            objects[doc["kind"]] = doc
    return objects


def container(objects: dict) -> dict:
    (only,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def env_value(c: dict, name: str) -> str:
    return next(e["value"] for e in c["env"] if e["name"] == name)


def test_k8s_base_has_every_object():
    assert set(base_objects()) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                   "ServiceMonitor", "PrometheusRule"}


def test_k8s_probes_point_at_livez_and_readyz():
    c = container(base_objects())
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert ports["http"] == 8000


def test_k8s_termination_outlasts_prestop_and_drain():
    objects = base_objects()
    c = container(objects)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + float(env_value(c, "VAE_GRACE_PERIOD_S"))
    assert objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > budget


def test_k8s_security_context_and_resources():
    objects = base_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert "/tmp" in [m["mountPath"] for m in c["volumeMounts"]]
    assert "replicas" not in objects["Deployment"]["spec"], "the HPA owns replicas"


def test_k8s_selectors_and_references_agree():
    objects = base_objects()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (("Deployment", objects["Deployment"]["spec"]["selector"]["matchLabels"]),
                           ("Service", objects["Service"]["spec"]["selector"]),
                           ("PodDisruptionBudget", objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])):
        assert selector.items() <= pod_labels.items(), f"the {kind} selects no pod"
    service = objects["Service"]
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in monitor["endpoints"])
    # jobLabel makes job="vae-service", the job the alerts and the dashboard expect.
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "vae-service"
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])


def test_k8s_overlays_pick_cpu_and_gpu():
    for overlay, tag in (("cpu", "cpu"), ("gpu", "cuda")):
        kustomization = load_yaml(DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml")
        assert kustomization["resources"] == ["../../base"]
        assert kustomization["images"][0]["newTag"] == tag
    gpu = (DEPLOY / "k8s" / "overlays" / "gpu" / "kustomization.yaml").read_text()
    patch = yaml.safe_load(load_yaml(DEPLOY / "k8s" / "overlays" / "gpu" / "kustomization.yaml")["patches"][0]["patch"])
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_value(c, "VAE_DEVICE") == "cuda"
    assert "nvidia.com/gpu" in gpu


# ------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict:
    """Stage name -> list of (instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            current = match.group(1) if match else f"stage{len(stages)}"
            stages[current] = []
        if current is not None:
            stages[current].append((instruction, args.strip()))
    return stages


def test_dockerfile_runtime_stage_is_last_non_root_with_healthcheck():
    stages = dockerfile_stages()
    name, runtime = list(stages.items())[-1]
    assert name == "runtime", "the last stage is what `docker build` produces by default"
    instructions = dict((i, a) for i, a in runtime)
    user = instructions["USER"].split(":")[0]
    assert user.isdigit() and user != "0", "USER must be numeric (runAsNonRoot can verify it) and not root"
    assert "/livez" in instructions["HEALTHCHECK"]
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    assert entrypoint[0].endswith("tini"), "PID 1 must forward SIGTERM to the service"
    json.loads(instructions["CMD"])  # exec form: no shell between tini and the service
    env = instructions["ENV"]
    assert "VAE_HOST=0.0.0.0" in env and "VAE_MODEL_PATH=/models/vae.ts" in env


def test_dockerfile_runtime_carries_no_training_extras():
    stages = dockerfile_stages()
    runtime = stages["runtime"]
    sources = [re.search(r"--from=(\S+)", a).group(1) for i, a in runtime if i == "COPY" and "--from=" in a]
    assert sources == ["venv", "model"], sources
    assert not any(i == "RUN" and "pip install" in a for i, a in runtime)
    assert 'p["optional-dependencies"]["train"]' in dict(stages["requirements"])["RUN"]
    assert any("requirements-train.txt" in a for i, a in stages["model-train"] if i == "RUN")
    assert not any("requirements-train.txt" in a for stage in ("deps", "venv") for i, a in stages[stage])


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for name, stage in dockerfile_stages().items():
        for instruction, args in stage:
            if instruction != "COPY" or "--from=" in args:
                continue
            for source in args.split()[:-1]:
                source = source.rstrip("*").rstrip("/")
                if source.startswith("${"):
                    continue  # MODEL_FILE: checked below
                assert source in allowed, f"stage {name} copies {source}, which .dockerignore leaves out"
    assert "models/*.ts" in allowed


KSERVE = DEPLOY / "kserve"


def test_kserve_runs_our_image_on_the_open_inference_protocol():
    """The ServingRuntime runs the service with the model where KServe's storage initializer leaves it, on one
    HTTP port with the protocol's probes; the InferenceService selects it by runtime and model format."""
    runtime = load_yaml(KSERVE / "servingruntime.yaml")
    service = load_yaml(KSERVE / "inferenceservice.yaml")
    spec = runtime["spec"]
    (container,) = spec["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    (port,) = container["ports"]
    assert spec["protocolVersions"] == ["v2"] and not spec["multiModel"]
    assert container["image"].startswith("vae-service") and container["args"] == ["vae-serve"]
    assert port["containerPort"] == int(env["VAE_PORT"]) and env["VAE_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port["containerPort"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert env["VAE_MODEL_PATH"].startswith("/mnt/models/")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert container["securityContext"]["readOnlyRootFilesystem"] and "/tmp" in mounts
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["storageUri"].rsplit("/", 1)[1] == env["VAE_MODEL_PATH"].rsplit("/", 1)[1]
    # The runtime's processes fit the CPUs it asks for.
    assert int(env["VAE_PROCESSES"]) <= int(container["resources"]["limits"]["cpu"])


def test_kserve_schemas_catch_a_misspelt_field():
    """The deploy checks validate the KServe kinds with these schemas (KServe's fields, unknown ones refused)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "ci" / "schemas" / "servingruntime.json").read_text())
    runtime = load_yaml(KSERVE / "servingruntime.yaml")
    jsonschema.validate(runtime, schema)
    runtime["spec"]["protocolVersion"] = ["v2"]  # the InferenceService's spelling, not the runtime's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(runtime, schema)
    service_schema = json.loads((DEPLOY / "ci" / "schemas" / "inferenceservice.json").read_text())
    jsonschema.validate(load_yaml(KSERVE / "inferenceservice.yaml"), service_schema)
