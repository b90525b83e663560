"""deploy/: the Kubernetes manifests, the systemd unit and the Dockerfile, verified as far
as a machine without a cluster, a systemd of its own or a container engine can.

- deploy/k8s is rendered as `kubectl apply -k` would (`kubectl kustomize`), every object
  is validated offline against the Kubernetes API schemas (kubernetes-validate, strict:
  an unknown or misspelt field fails) for the oldest and newest cluster versions we
  claim, and the rendered objects are checked for what an operator of a long-lived-
  connection service expects: drain before SIGKILL, probes, secrets from Secrets, a
  restrictive securityContext, a PodDisruptionBudget, an HPA on the open-connections
  gauge, a NetworkPolicy that limits egress.
- deploy/ksw1fast.service passes `systemd-analyze verify` and `systemd-analyze security`
  (offline), and keeps its sandboxing directives.
- deploy/Dockerfile is never built here: its USER, EXPOSE, ENTRYPOINT and HEALTHCHECK are
  checked against the manifests, and its command lines against ksw1fast's own parser.

kubectl and systemd-analyze come from Debian (scripts/deploy-tools.sh, run by
scripts/test.sh). The tests that run them carry the `deploy_tools` marker, deselected in
cibuildwheel's images (which lack both); elsewhere a missing tool fails the test: the
project installs what it tests with.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# one rewriting helper for deploy files, shared with the balancer tests and benchmarks;
# `benchmarks` is not packaged: appended, so `ksw1fast` stays the installed package
sys.path.append(str(REPO))
from benchmarks.baselines.nginx import rewrite  # noqa: E402

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "ksw1fast.service"
# The cluster versions the manifests must be valid for: the oldest we claim (PDB policy/v1
# and HPA autoscaling/v2 are GA long before it) and a current one. kubernetes-validate
# bundles the schemas of each (pyproject.toml's test extra asks for one that does).
K8S_VERSIONS = ("1.29.0", "1.34.0")
# `systemd-analyze security` exposure, 0-100 (it prints it divided by 10): at most 2.0
SECURITY_THRESHOLD = 20
# the supervisor kills workers still draining this long after drain_timeout (ops/workers)
SUPERVISOR_MARGIN = 10

deploy_tools = pytest.mark.deploy_tools


# --- helpers ------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """The tool's path; a failure without it (the project's scripts install it, as
    tests/test_node_client.py asks for Node.js)."""
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: run scripts/deploy-tools.sh")
    return found


def _pkcs11_example(toml_text: str) -> str:
    """The ConfigMap's config with its commented [pkcs11] example (four lines) in force."""
    return rewrite(toml_text, r"^(\s*)# (\[pkcs11\]|lib = |pin_env = |deny = )",
                   r"\g<1>\g<2>", 4)


def _raw_manifests() -> dict[str, dict]:
    """deploy/k8s/*.yaml as written, by kind (one object of each)."""
    docs: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} objects"
            docs[doc["kind"]] = doc
    return docs


def _serve_config(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                  config_dir: Path | None = None) -> Any:
    """A `ksw1fast serve` command line as the gateway would take it: parsed, merged with
    its config file, and past the security checks (with the token secret set)."""
    from ksw1fast.cli.main import build_parser, config_from_args
    from ksw1fast.security.gate import Security

    if config_dir is not None:  # the mount path of the config, here
        argv = [str(config_dir / Path(a).name) if a.startswith("/etc/ksw1fast/") else a
                for a in argv]
    assert argv[0] == "serve"
    config = config_from_args(build_parser().parse_args(argv))
    assert config.token_secret_env, "beyond loopback ksw1fast needs tokens"
    monkeypatch.setenv(config.token_secret_env, "not-a-real-secret")
    Security(config)  # refuses 0.0.0.0 without tokens, as `serve` would
    return config


def _connections_gauge() -> str:
    """The name of the gauge of open connections, as ksw1fast/ops/metrics.py defines it."""
    from ksw1fast.ops import metrics

    (family,) = metrics.CONNECTIONS.describe()
    assert family.type == "gauge"
    return family.name


# --- the rendered manifests ---------------------------------------------------------------

class Rendered:
    """`kubectl kustomize deploy/k8s`: every object, and one of each kind by kind."""

    def __init__(self, text: str) -> None:
        self.objects = [doc for doc in yaml.safe_load_all(text) if doc]
        self.kinds: dict[str, dict] = {}
        for doc in self.objects:
            assert doc["kind"] not in self.kinds, f"two {doc['kind']} objects"
            self.kinds[doc["kind"]] = doc

    def __getitem__(self, kind: str) -> dict:
        return self.kinds[kind]

    @property
    def pod(self) -> dict:
        return self["Deployment"]["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        (container,) = self.pod["containers"]
        return container

    @property
    def settings(self) -> dict:
        return tomllib.loads(self["ConfigMap"]["data"]["ksw1fast.toml"])

    @property
    def ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.container["ports"]}

    def port_number(self, port: int | str) -> int:
        return port if isinstance(port, int) else self.ports[port]


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    kubectl = _tool("kubectl")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "KUBECONFIG": os.devnull})
    assert done.returncode == 0, done.stderr
    return Rendered(done.stdout)


def test_the_kustomization_lists_every_manifest() -> None:
    docs = _raw_manifests()
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@deploy_tools
def test_rendering_keeps_every_object(rendered: Rendered) -> None:
    raw = _raw_manifests()
    del raw["Kustomization"]
    assert rendered.kinds.keys() == raw.keys()
    assert {"Deployment", "Service", "ConfigMap", "Ingress", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy"} <= rendered.kinds.keys()
    # no secret material in the repository: operators create the Secrets
    assert "Secret" not in rendered.kinds


@deploy_tools
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_the_kubernetes_schemas(rendered: Rendered, version: str) -> None:
    import kubernetes_validate

    for obj in rendered.objects:
        # a kind without a bundled schema raises SchemaNotFoundError: a failure, not a pass
        checked = kubernetes_validate.validate(obj, version, strict=True)
        assert checked == version.rsplit(".", 1)[0], (obj["kind"], checked)


@deploy_tools
def test_strict_validation_refuses_a_misspelt_field(rendered: Rendered) -> None:
    """The check above would catch a typo in a securityContext, not only a wrong type."""
    import copy

    import kubernetes_validate

    deployment = copy.deepcopy(rendered["Deployment"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["securityContext"]["readOnlyRootFileSystem"] = True  # sic: FileSystem
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@deploy_tools
def test_the_configmap_is_a_valid_config(rendered: Rendered, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ksw1fast.cli.config_file import check_config_file

    toml_text = rendered["ConfigMap"]["data"]["ksw1fast.toml"]
    monkeypatch.setenv(rendered.settings["token_secret_env"], "not-a-real-secret")
    (tmp_path / "ksw1fast.toml").write_text(toml_text)
    check_config_file(tmp_path / "ksw1fast.toml")  # what `ksw1fast check-config` runs
    # and so are the commented examples, once uncommented
    examples = _pkcs11_example(
        rewrite(toml_text, r"^(\s*)# (trusted_proxies = )", r"\g<1>\g<2>", 1))
    (tmp_path / "examples.toml").write_text(examples)
    monkeypatch.setenv(tomllib.loads(examples)["pkcs11"]["pin_env"], "1234")  # the Secret's
    check_config_file(tmp_path / "examples.toml")


@deploy_tools
def test_the_deployment_serves_the_configmap(rendered: Rendered, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    settings = rendered.settings
    (tmp_path / "ksw1fast.toml").write_text(rendered["ConfigMap"]["data"]["ksw1fast.toml"])
    container = rendered.container
    config = _serve_config(container["args"], monkeypatch, tmp_path)
    assert config.host == "0.0.0.0" and config.metrics_host == "0.0.0.0"
    assert rendered.ports == {"ws": settings["port"], "metrics": settings["metrics_port"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][-1] == mounts["config"] + "/ksw1fast.toml"
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == rendered["ConfigMap"]["metadata"]["name"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


@deploy_tools
def test_probes_ask_readyz_and_healthz_on_the_metrics_port(rendered: Rendered) -> None:
    container = rendered.container
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # readiness must notice a drain at once; liveness must not restart a busy pod early
    assert container["readinessProbe"]["failureThreshold"] == 1
    assert container["livenessProbe"]["failureThreshold"] >= 3


@deploy_tools
def test_the_grace_period_outlasts_prestop_and_drain(rendered: Rendered) -> None:
    pod, settings = rendered.pod, rendered.settings
    command = rendered.container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    sleep = int(command[1])
    assert sleep >= 1, "endpoints need a moment to drop the pod before the listener closes"
    # the kubelet must not SIGKILL while the drain is still waiting on tunnels
    assert pod["terminationGracePeriodSeconds"] > sleep + settings["drain_timeout"]
    # and a rolling update starts no drain before a new pod is ready
    rolling = rendered["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


@deploy_tools
def test_secrets_come_from_secrets(rendered: Rendered) -> None:
    """Every variable the config reads a secret from (the token secret, a PKCS#11 PIN in
    the commented example) is set from a Secret, never from a literal."""
    settings = rendered.settings
    example = tomllib.loads(_pkcs11_example(rendered["ConfigMap"]["data"]["ksw1fast.toml"]))
    wanted = {settings["token_secret_env"], example["pkcs11"]["pin_env"]}
    env = {e["name"]: e for e in rendered.container["env"]}
    for name in wanted:
        assert name in env, f"{name}: not set"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and "value" not in env[name]
    # the token secret is required: a pod that would refuse to start must not schedule
    assert not env[settings["token_secret_env"]]["valueFrom"]["secretKeyRef"].get("optional")
    assert "envFrom" not in rendered.container


@deploy_tools
def test_the_pod_runs_restricted(rendered: Rendered) -> None:
    pod, container = rendered.pod, rendered.container
    pod_sc, sc = pod["securityContext"], container["securityContext"]

    def effective(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") not in (None, 0) and effective("runAsGroup") not in (None, 0)
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert pod["automountServiceAccountToken"] is False
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host)
    # writable: only an emptyDir (/tmp); the config is mounted read-only
    for volume in pod["volumes"]:
        assert volume.keys() & {"emptyDir", "configMap", "secret"}, volume
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["config"]["readOnly"] is True


@deploy_tools
def test_the_disruption_budget_covers_the_pods(rendered: Rendered) -> None:
    pdb = rendered["PodDisruptionBudget"]["spec"]
    labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # one pod at a time, whatever the HPA scaled to
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb


@deploy_tools
def test_the_autoscaler_scales_on_open_connections(rendered: Rendered) -> None:
    gauge = _connections_gauge()
    hpa = rendered["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    deployment = rendered["Deployment"]
    assert spec["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"],
                                      "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    # the HPA owns the count: an apply must not set it back
    assert "replicas" not in deployment["spec"]
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    pods = [m["pods"] for m in spec["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [gauge]
    assert pods[0]["target"]["type"] == "AverageValue"
    assert int(pods[0]["target"]["averageValue"]) > 0
    # a scale-down closes tunnels: slowly, one pod at a time
    down = spec["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])

    # Prometheus scrapes the gauge where the pod serves it...
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == rendered.ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    # ...and the adapter's rule serves it to the HPA under the name the HPA asks for
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(gauge + "{")
    assert re.fullmatch(rule["name"]["matches"], gauge) and rule["name"]["as"] == gauge
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


@deploy_tools
def test_the_network_policy_limits_ingress_and_egress(rendered: Rendered) -> None:
    from ksw1fast.security.egress import ANY_PORT, Rule, parse_rule

    policy = rendered["NetworkPolicy"]["spec"]
    labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}

    # ingress: the WebSocket and metrics ports only, each rule naming its sources
    ingress = [(p["protocol"], rendered.port_number(p["port"]))
               for rule in policy["ingress"] for p in rule["ports"]]
    assert sorted(ingress) == sorted(("TCP", port) for port in rendered.ports.values())
    assert all(rule.get("from") for rule in policy["ingress"])

    # egress: DNS to kube-dns, and each destination the ConfigMap's egress rules allow
    egress = policy["egress"]
    assert all(rule.get("to") and rule.get("ports") for rule in egress), "no allow-all rule"
    dns = [rule for rule in egress
           if any(to.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
                  for to in rule["to"])]
    assert len(dns) == 1
    assert {(p["protocol"], p["port"]) for p in dns[0]["ports"]} == {("UDP", 53), ("TCP", 53)}
    allowed = {(p["protocol"], p["port"]) for rule in egress for p in rule["ports"]}
    rules = [r if isinstance(r, Rule) else parse_rule(r) for r in rendered.settings["egress"]]
    for rule in rules:
        if rule.action == "allow":
            assert rule.ports != ANY_PORT and rule.ports[0] == rule.ports[1], str(rule)
            for proto in ([rule.proto] if rule.proto else ["tcp", "udp"]):
                assert (proto.upper(), rule.ports[0]) in allowed, f"{rule}: no egress rule"


@deploy_tools
def test_the_service_and_ingress_reach_the_pods(rendered: Rendered) -> None:
    service = rendered["Service"]["spec"]
    labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert service["type"] == "ClusterIP" and "sessionAffinity" not in service
    assert {p["targetPort"] for p in service["ports"]} == rendered.ports.keys()
    paths = rendered["Ingress"]["spec"]["rules"][0]["http"]["paths"]
    (path,) = paths
    assert path["path"] == rendered.settings["path"]
    assert path["backend"]["service"]["port"]["name"] == "ws"  # never the metrics port
    annotations = rendered["Ingress"]["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > \
        rendered.settings["idle_ping"]


def test_the_deployment_doc_covers_every_file() -> None:
    doc = (REPO / "docs" / "deployment.md").read_text()
    for path in [*K8S.glob("*.yaml"), K8S / "prometheus-adapter" / "values.yaml",
                 UNIT, DEPLOY / "Dockerfile"]:
        assert str(path.relative_to(REPO)) in doc, f"{path.name}: not in docs/deployment.md"
    for word in ("prometheus-adapter", _connections_gauge(), "systemd-analyze",
                 "never built"):
        assert word in doc, word


# --- the systemd unit ---------------------------------------------------------------------

def _unit() -> list[tuple[str, str, str]]:
    """(section, key, value) in order: a key may repeat (SystemCallFilter=)."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, line
        entries.append((section, key.strip(), value.strip()))
    return entries


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_the_unit_keeps_its_sandbox() -> None:
    service = {}
    for section, key, value in _unit():
        if section == "Service":
            service.setdefault(key, []).append(value)
    one = {key: values[-1] for key, values in service.items()}
    expected = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes", "SystemCallArchitectures": "native",
        "KillSignal": "SIGTERM", "KillMode": "mixed",
    }
    for key, value in expected.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}, expected {value!r}"
    families = set(one["RestrictAddressFamilies"].split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families <= {
        "AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert service["SystemCallFilter"][0] == "@system-service"
    # the secrets: from a root-only file systemd reads, not from the unit
    assert one["EnvironmentFile"].lstrip("-").startswith("/etc/ksw1fast/")
    assert not any(key == "Environment" and "SECRET" in value.upper()
                   for _, key, value in _unit())
    assert one["Restart"] in ("on-failure", "always")


def test_the_unit_runs_serve_and_outlasts_the_drain(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ksw1fast.config import GatewayConfig

    service = {key: value for section, key, value in _unit() if section == "Service"}
    binary, *argv = shlex.split(service["ExecStart"])
    assert Path(binary).name == "ksw1fast" and Path(binary).is_absolute()
    assert argv == ["serve", "--config", "/etc/ksw1fast/ksw1fast.toml"]
    # any config the ConfigMap's way would do: with it, the command line must parse and pass
    config_text = _raw_manifests()["ConfigMap"]["data"]["ksw1fast.toml"]
    (tmp_path / "ksw1fast.toml").write_text(config_text)
    config = _serve_config(argv, monkeypatch, tmp_path)
    # systemd SIGKILLs what is left after TimeoutStopSec: the drain and the supervisor's
    # margin after it must fit, for the default drain_timeout and the ConfigMap's
    stop = _seconds(service["TimeoutStopSec"])
    for drain in (GatewayConfig().drain_timeout, config.drain_timeout):
        assert stop >= drain + SUPERVISOR_MARGIN, (stop, drain)


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary (not installed here) replaced by one that exists:
    verify checks that it is executable. The rewrite must match once."""
    text = rewrite(UNIT.read_text(), r"^(ExecStart=)/opt/ksw1fast/bin/ksw1fast ",
                   rf"\g<1>{sys.executable} ", 1)
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


@deploy_tools
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    # verify exits 0 on an unknown key or a bad value: it only warns, so no output at all
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr


@deploy_tools
def test_systemd_analyze_verify_would_see_a_typo(tmp_path: Path) -> None:
    """The check above is not blind: a misspelt directive is reported."""
    analyze = _tool("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    unit.write_text(rewrite(unit.read_text(), r"^ProtectHome=yes$", "ProtectHomes=yes", 1))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert "ProtectHomes" in done.stdout + done.stderr


@deploy_tools
def test_systemd_analyze_security_rates_the_sandbox_ok(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    done = subprocess.run([analyze, "security", "--offline=yes", "--no-pager",
                           f"--threshold={SECURITY_THRESHOLD}", str(unit)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


# --- the Dockerfile -----------------------------------------------------------------------

def _dockerfile() -> dict[str, list[str]]:
    """Instructions by keyword, in order (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word, []).append(rest.strip())
    return instructions


def test_the_dockerfile_matches_the_manifests(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No container engine here: the image is never built, so what the manifests assume
    of it is checked against its instructions."""
    instructions = _dockerfile()
    docs = _raw_manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert instructions["FROM"][-1] == "python:3.11-slim"  # the stage that runs
    assert any("ksw1fast[metrics,pkcs11]" in run for run in instructions["RUN"])
    # the user: numeric, not root, the one the pod runs as
    user, _, group = instructions["USER"][-1].partition(":")
    assert user.isdigit() and int(user) != 0
    assert int(user) == pod["securityContext"]["runAsUser"]
    assert int(group) == pod["securityContext"]["runAsGroup"]
    # the ports
    exposed = {int(p.split("/")[0]) for p in instructions["EXPOSE"][-1].split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}
    # the entrypoint with the pod's args is a `ksw1fast serve` that parses and passes
    entrypoint = json.loads(instructions["ENTRYPOINT"][-1])
    assert entrypoint == ["ksw1fast"]
    (tmp_path / "ksw1fast.toml").write_text(docs["ConfigMap"]["data"]["ksw1fast.toml"])
    config = _serve_config([*entrypoint[1:], *container["args"]], monkeypatch, tmp_path)
    assert (config.port, config.metrics_port) == (8088, 9108)
    # and so is its own CMD, for plain `docker run`
    config = _serve_config(json.loads(instructions["CMD"][-1]), monkeypatch)
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 8088, 9108)
    # its HEALTHCHECK asks what the liveness probe asks
    (healthcheck,) = instructions["HEALTHCHECK"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", healthcheck)
    assert url, healthcheck
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert (int(url.group(1)), url.group(2)) == (ports[probe["port"]], probe["path"])
    assert instructions["STOPSIGNAL"] == ["SIGTERM"]
    # the preStop hook's binary comes with the base image (Debian coreutils)
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    for copy in instructions["COPY"]:
        if not copy.startswith("--from"):
            for source in copy.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_the_dockerfile_cmd_and_the_configmap_agree_on_the_secret_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker run -e KSW1FAST_TOKEN_SECRET=...` and the pod's Secret set the same one."""
    docs = _raw_manifests()
    settings = tomllib.loads(docs["ConfigMap"]["data"]["ksw1fast.toml"])
    cmd = _serve_config(json.loads(_dockerfile()["CMD"][-1]), monkeypatch)
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert cmd.token_secret_env == settings["token_secret_env"]
    assert settings["token_secret_env"] in {env["name"] for env in container["env"]}
