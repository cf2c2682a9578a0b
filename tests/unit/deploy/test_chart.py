"""The Helm chart, rendered offline (helm-python-sdk) and checked as Kubernetes would.

Each value set renders once per module. Every manifest is validated against the bundled
Kubernetes schemas in strict mode (unknown fields fail), then the objects are checked for
what the schemas cannot know: ports that agree, probes on every role, secrets referenced but
never inlined, bootstrap addresses, node spans, drain timing, GPUs where the values put them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from swarmgate.cli import build_parser
from swarmgate.commands import check_exposure

CHART = Path(__file__).resolve().parents[3] / "charts" / "swarmgate"
RELEASE = "demo"
NAMESPACE = "llm"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate bundles (offline).
KUBE_VERSIONS = ("1.30.0", "1.37.0")
# Kinds from CRDs, for which kubernetes-validate bundles no schema; checked by hand below.
CRD_KINDS = {"ServiceMonitor"}
ROLES = {"dht", "node", "gateway"}

SWARM_KEY = "swarmgate-swarm-key"
SERVER_CREDENTIAL = "swarmgate-server-credential"
GATEWAY_CREDENTIAL = "swarmgate-gateway-credential"
# Which credential each role's pods take (credentials.<role>): node and dht pods the server's.
CREDENTIAL_ROLE = {"dht": "server", "node": "server", "gateway": "gateway"}
API_KEYS = "swarmgate-api-keys"
DHT_IDENTITY = "swarmgate-dht-identity"
REDIS_AUTH = "swarmgate-redis-auth"
REDIS_URL_SECRET = "swarmgate-redis-url"
EXTERNAL_PEER = "/dns4/bootstrap.example.com/tcp/31337/p2p/12D3KooWBootstrapPeerIdForTests"
HF_TOKEN_SECRET = "hf-token"
HF_REVISION = "0123456789abcdef0123456789abcdef01234567"
GPU_EXAMPLE = CHART / "examples" / "gpu-llama-70b.yaml"


def gpu_values() -> dict[str, Any]:
    """The chart's GPU example as shipped, with a commit pinned as its comment advises."""
    values: dict[str, Any] = yaml.safe_load(GPU_EXAMPLE.read_text())
    values["model"]["revision"] = HF_REVISION
    return values


VALUE_SETS: dict[str, dict[str, Any]] = {
    # The least an install needs: the swarm key's Secret.
    "defaults": {"swarmKey": {"existingSecret": SWARM_KEY}},
    # Two bootstrap peers, three node groups (one "auto"), every secret, every monitor.
    "swarm": {
        "swarmKey": {"existingSecret": SWARM_KEY},
        "swarm": {"namespace": "team-a", "initialPeers": [EXTERNAL_PEER]},
        "dht": {"replicas": 2, "identity": {"existingSecret": DHT_IDENTITY}},
        "nodes": [
            {
                "name": "head",
                "blocks": "0:10",
                "replicas": 2,
                "dtype": "bfloat16",
                "cacheBytes": 3 * 2**30,
                "nodeSelector": {"pool": "cpu-large"},
                "tolerations": [{"key": "llm", "operator": "Exists", "effect": "NoSchedule"}],
                "resources": {"limits": {"memory": "8Gi"}},
                "extraArgs": ["--announce-period", "5"],
            },
            {
                "name": "tail",
                "blocks": "10:30",
                "quant": "int8",
                "adapters": ["/adapters/pirate", "/adapters/legal"],
                "drainTimeout": 120,
                "terminationGracePeriodSeconds": 150,
            },
            {
                "name": "spare",
                "blocks": "auto",
                "numBlocks": 10,
                "replicas": 3,
                "identity": {"persistence": {"enabled": False}},
                "podDisruptionBudget": {"enabled": True},
            },
        ],
        "gateway": {"replicas": 3, "apiKeys": {"existingSecret": API_KEYS}},
        "redis": {"auth": {"existingSecret": REDIS_AUTH}},
        "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    },
    # Public edge: Ingress with TLS, autoscaling, a disruption budget; a model on a volume.
    "edge": {
        "swarmKey": {"existingSecret": SWARM_KEY},
        "model": {
            "id": "/models/SmolLM2-360M-Instruct",
            "name": "smollm2-360m",
            "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        },
        "nodes": [{"name": "all", "blocks": "0:32"}],
        "gateway": {
            "apiKeys": {"existingSecret": API_KEYS},
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [
                    {"host": "llm.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}
                ],
                "tls": [{"hosts": ["llm.example.com"], "secretName": "llm-example-tls"}],
            },
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 6,
                "targetMemoryUtilizationPercentage": 80,
            },
            "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        },
    },
    # Redis outside the release: its URL, password included, from a Secret.
    "external-redis": {
        "swarmKey": {"existingSecret": SWARM_KEY},
        "gateway": {"replicas": 2},
        "redis": {"enabled": False, "existingSecret": REDIS_URL_SECRET},
    },
    # Each role's own credential from its own Secret; the swarm key stays offline.
    "credentials": {
        "credentials": {
            "server": {"existingSecret": SERVER_CREDENTIAL},
            "gateway": {"existingSecret": GATEWAY_CREDENTIAL, "key": "gateway.cred"},
        },
        "dht": {"replicas": 2},
    },
    # An open swarm, chosen explicitly, with a plain Redis URL.
    "open": {
        "swarmKey": {"open": True},
        "redis": {"enabled": False, "url": "redis://redis.cache.svc.cluster.local:6379/2"},
    },
    # examples/gpu-llama-70b.yaml: a Hub model on four GPU node groups and a GPU gateway.
    "gpu": gpu_values(),
}

# What gateways and nodes export on /metrics; histograms add _bucket, _sum and _count.
GATEWAY_METRICS = {
    "swarmgate_requests_total",
    "swarmgate_prompt_tokens_total",
    "swarmgate_cached_prompt_tokens_total",
    "swarmgate_generated_tokens_total",
    "swarmgate_active_generations",
    "swarmgate_queued_requests",
    "swarmgate_replans_total",
    "swarmgate_failovers_total",
    "swarmgate_server_failures_total",
    "swarmgate_affinity_errors_total",
}
NODE_METRICS = {
    "swarmgate_node_open_streams",
    "swarmgate_node_cached_sessions",
    "swarmgate_node_cache_bytes_free",
    "swarmgate_node_cache_bytes_budget",
    "swarmgate_node_cache_evictions_total",
    "swarmgate_node_tokens_computed_total",
    "swarmgate_node_tokens_reused_total",
}
HISTOGRAMS = {
    "swarmgate_time_to_first_token_seconds",
    "swarmgate_inter_token_seconds",
    "swarmgate_hop_step_seconds",
    "swarmgate_node_step_seconds",
    "swarmgate_node_batch_sessions",
    "swarmgate_node_batch_tokens",
    "swarmgate_head_batch_rows",
}


# ---- rendering -------------------------------------------------------------------------


def render(chart: helm_python.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart: helm_python.Chart) -> dict[str, dict[str, str]]:
    """Template path → text, per value set; rendered once for the whole module."""
    return {name: render(chart, values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def manifests(rendered: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [
            doc
            for path, text in templates.items()
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            if doc
        ]
        for name, templates in rendered.items()
    }


# ---- reading objects -------------------------------------------------------------------


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert found
    return found


def component(obj: dict[str, Any]) -> str:
    return obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def members(objects: list[dict[str, Any]], role: str | None = None) -> list[dict[str, Any]]:
    """Workloads that run swarmgate (of one role when given)."""
    found = [w for w in workloads(objects) if component(w) in ROLES]
    found = [w for w in found if role is None or component(w) == role]
    assert found, f"no {role or 'swarmgate'} workload"
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> list[str]:
    """The values after ``name`` up to the next option; the last occurrence wins, as in
    argparse."""
    positions = [i for i, a in enumerate(args) if a == name]
    if not positions:
        return []
    values = []
    for arg in args[positions[-1] + 1 :]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def env(ctr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ctr.get("env", [])}


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    claims = {c["metadata"]["name"]: c for c in workload["spec"].get("volumeClaimTemplates", [])}
    assert name in volumes or name in claims, f"no volume {name}"
    return volumes.get(name) or {"name": name, "claim": claims[name]}


def mount_of(ctr: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount under which ``path`` lies (the deepest one)."""
    found = [m for m in ctr.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")]
    assert found, f"{path} is on no volume"
    return max(found, key=lambda m: len(m["mountPath"]))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pods_selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        w
        for w in workloads(objects)
        if selects(selector, w["spec"]["template"]["metadata"]["labels"])
    ]


def port_named(ctr: dict[str, Any], name: str | int) -> int:
    if isinstance(name, int):
        assert name in [p["containerPort"] for p in ctr["ports"]], f"no container port {name}"
        return name
    by_name = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert name in by_name, f"container {ctr['name']} has no port named {name}"
    return by_name[name]


def tcp_port(maddr: str) -> int:
    match = re.fullmatch(r"/ip4/[^/]+/tcp/(\d+)", maddr)
    assert match, maddr
    return int(match.group(1))


# ---- the chart as a whole --------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lints_strictly(name: str) -> None:
    report = helm_python.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info: "icon is recommended") is advice.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_strictly(
    manifests: dict[str, list[dict[str, Any]]], name: str, kube_version: str
) -> None:
    objects = manifests[name]
    assert len(objects) >= 8
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(obj, kube_version, strict=True)
        else:
            kubernetes_validate.validate(obj, kube_version, strict=True)


def test_the_validator_cli_passes_offline(
    manifests: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    # The command CI and operators run (`helm template ... | kubernetes-validate --strict`).
    files = []
    for name in ("swarm", "edge"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(manifests[name]))
        files.append(str(path))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(cli), "--strict", "--quiet", "-k", KUBE_VERSIONS[0], *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({}, ["credentials.server.existingSecret", "credentials.gateway.existingSecret"]),
        (
            {"credentials": {"server": {"existingSecret": SERVER_CREDENTIAL}}},
            ["credentials.gateway.existingSecret (gateway pods)"],
        ),
        (
            {"credentials": {"gateway": {"existingSecret": GATEWAY_CREDENTIAL}}},
            ["credentials.server.existingSecret (node and dht pods)"],
        ),
    ],
    ids=["neither", "no-gateway", "no-server"],
)
def test_every_role_needs_a_membership_unless_the_swarm_is_open(
    chart: helm_python.Chart, values: dict[str, Any], missing: list[str]
) -> None:
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render(chart, values)
    message = str(refused.value)
    assert "swarm membership is required" in message
    for name in missing:
        assert name in message
    for role in ("server", "gateway"):
        if not any(name.startswith(f"credentials.{role}.") for name in missing):
            assert f"credentials.{role}.existingSecret (" not in message
    # The per-role way first, each command as the operator types it; the swarm key second.
    commands = [
        "swarmgate keygen swarm.key",
        "swarmgate issue --swarm-key swarm.key --role server --days 90 server.cred",
        "swarmgate issue --swarm-key swarm.key --role gateway --days 90 gateway.cred",
        f"kubectl create secret generic {SERVER_CREDENTIAL} --from-file=credential=server.cred",
        f"kubectl create secret generic {GATEWAY_CREDENTIAL} --from-file=credential=gateway.cred",
        f"--set credentials.server.existingSecret={SERVER_CREDENTIAL}",
        f"--set credentials.gateway.existingSecret={GATEWAY_CREDENTIAL}",
        f"kubectl create secret generic {SWARM_KEY} --from-file=swarm.key",
        f"--set swarmKey.existingSecret={SWARM_KEY}",
        "swarmKey.open=true",
    ]
    positions = [message.find(command) for command in commands]
    assert -1 not in positions, [c for c, i in zip(commands, positions, strict=True) if i < 0]
    assert positions == sorted(positions)
    # Either Secret covers a role on its own: the swarm key all, or both credentials.
    render(chart, {**values, "swarmKey": {"existingSecret": SWARM_KEY}})
    both = {"server": {"existingSecret": "s"}, "gateway": {"existingSecret": "g"}}
    render(chart, {"credentials": both})


@pytest.mark.parametrize(
    ("values", "what"),
    [
        ({"swarmKey": {"existingSecret": SWARM_KEY}}, "swarmKey.existingSecret is"),
        (
            {"credentials": {"server": {"existingSecret": SERVER_CREDENTIAL}}},
            "credentials.server.existingSecret is",
        ),
        (
            {"credentials": {"gateway": {"existingSecret": GATEWAY_CREDENTIAL}}},
            "credentials.gateway.existingSecret is",
        ),
        (
            {
                "swarmKey": {"existingSecret": SWARM_KEY},
                "credentials": {"gateway": {"existingSecret": GATEWAY_CREDENTIAL}},
            },
            "swarmKey.existingSecret and credentials.gateway.existingSecret are",
        ),
    ],
    ids=["swarm-key", "server", "gateway", "two"],
)
def test_an_open_swarm_takes_no_secret(
    chart: helm_python.Chart, values: dict[str, Any], what: str
) -> None:
    values = {**values, "swarmKey": {**values.get("swarmKey", {}), "open": True}}
    with pytest.raises(helm_python.HelmRenderError, match="choose one") as refused:
        render(chart, values)
    assert f"swarmKey.open=true while {what} set" in str(refused.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {
                "credentials": {
                    "server": {"existingSecret": SERVER_CREDENTIAL},
                    "gateway": {"existingSecret": SERVER_CREDENTIAL, "key": "gateway"},
                }
            },
            "gateway pods must never get the server's Secret",
        ),
        (
            {
                "swarmKey": {"existingSecret": SWARM_KEY},
                "credentials": {"gateway": {"existingSecret": SWARM_KEY}},
            },
            "gateway pods must not get the swarm key when they have a credential",
        ),
    ],
    ids=["server-secret", "swarm-key-secret"],
)
def test_a_gateway_credential_needs_a_secret_of_its_own(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"nodes": [{"name": "a", "blocks": "0:30", "replica": 2}]}, "/nodes/0"),
        ({"nodeDefaults": {"cachebytes": 1}}, "/nodeDefaults"),
        ({"nodes": [{"name": "a", "blocks": 15}]}, "/nodes/0/blocks"),
        ({"nodes": [{"name": "a", "blocks": "0-15"}]}, "/nodes/0/blocks"),
        ({"nodes": [{"name": "A_b", "blocks": "0:30"}]}, "/nodes/0/name"),
        ({"nodes": [{"name": "a", "blocks": "0:30", "dtype": "fp16"}]}, "/nodes/0/dtype"),
        ({"gateway": {"replicaCount": 2}}, "/gateway"),
        ({"dht": {"identity": {"secret": "x"}}}, "/dht/identity"),
        ({"ingress": {"enabled": True}}, "ingress"),
        *(
            (
                {
                    "gateway": {
                        "ingress": {
                            "hosts": [
                                {"host": "h", "paths": [{"path": path, "pathType": "Prefix"}]}
                            ]
                        }
                    }
                },
                "/gateway/ingress/hosts/0/paths/0/path",
            )
            for path in ("/", "/metrics", "/swarm", "/docs", "/v1beta", "v1")
        ),
        ({"gateway": {"queueTimeout": -1}}, "/gateway/queueTimeout"),
        ({"gateway": {"maxConcurrentPerKey": 0}}, "/gateway/maxConcurrentPerKey"),
        ({"logging": {"format": "yaml"}}, "/logging/format"),
        ({"gateway": {"responseTtlSeconds": 0}}, "/gateway/responseTtlSeconds"),
        ({"gateway": {"responseTtlSeconds": "1d"}}, "/gateway/responseTtlSeconds"),
        ({"model": {"revison": "main"}}, "/model"),
        ({"credentials": {"servers": {"existingSecret": "s"}}}, "/credentials"),
        ({"credentials": {"gateway": {"secret": "g"}}}, "/credentials/gateway"),
        (
            {"credentials": {"gateway": {"existingSecret": 1}}},
            "/credentials/gateway/existingSecret",
        ),
        ({"credentials": {"server": {"existingSecret": "Server_Cred"}}}, "/credentials/server"),
        ({"credentials": {"server": {"key": ""}}}, "/credentials/server/key"),
        ({"model": {"hfToken": {"secret": "hf-token"}}}, "/model/hfToken"),
        ({"model": {"hfToken": {"existingSecret": "hf-token", "key": ""}}}, "/model/hfToken/key"),
        ({"hfCache": {"mountpath": "/hf"}}, "/hfCache"),
        ({"hfCache": {"mountPath": "hf"}}, "/hfCache/mountPath"),
        ({"hfCache": {"persistence": {"existingclaim": "hf"}}}, "/hfCache/persistence"),
        ({"hfCache": {"persistence": {"size": "200GB"}}}, "/hfCache/persistence/size"),
        ({"nodeDefaults": {"device": "gpu"}}, "/nodeDefaults/device"),
        ({"nodeDefaults": {"dtype": "fp16"}}, "/nodeDefaults/dtype"),
        ({"nodes": [{"name": "a", "blocks": "0:30", "device": "cuda0"}]}, "/nodes/0/device"),
        ({"nodes": [{"name": "a", "blocks": "0:30", "runtimeClass": "nvidia"}]}, "/nodes/0"),
        (
            {"nodes": [{"name": "a", "blocks": "0:30", "runtimeClassName": "Nvidia"}]},
            "/nodes/0/runtimeClassName",
        ),
        ({"gateway": {"device": "gpu"}}, "/gateway/device"),
        ({"gateway": {"dtype": "half"}}, "/gateway/dtype"),
        ({"gateway": {"runtimeClassname": "nvidia"}}, "/gateway"),
        ({"gateway": {"startupTimeoutSeconds": "10m"}}, "/gateway/startupTimeoutSeconds"),
        ({"gateway": {"resources": {"limit": {"nvidia.com/gpu": 1}}}}, "/gateway/resources"),
        (
            {"nodeDefaults": {"resources": {"limits": {"nvidia.com/gpu": "one"}}}},
            "/nodeDefaults/resources/limits",
        ),
    ],
)
def test_the_schema_rejects_typos(
    chart: helm_python.Chart, values: dict[str, Any], where: str
) -> None:
    values = {"swarmKey": {"existingSecret": SWARM_KEY}, **values}
    with pytest.raises(helm_python.HelmValuesError) as rejected:
        chart.validate_schema(values)
    assert where in str(rejected.value)
    with pytest.raises(helm_python.HelmValuesError):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nodes": [{"name": "a", "blocks": "0:30", "numBlocks": 5}]}, "numBlocks applies"),
        ({"nodes": [{"name": "a", "blocks": "20:10"}]}, "START must be below END"),
        ({"nodes": [{"name": "a", "blocks": "0:40"}]}, "smollm2 has 30 blocks"),
        ({"nodes": [{"name": "a"}, {"name": "a"}]}, "two groups are named"),
        (
            {"nodes": [{"name": "a", "drainTimeout": 60, "terminationGracePeriodSeconds": 60}]},
            "must exceed drainTimeout",
        ),
        ({"redis": {"url": "redis://x:6379/0"}}, "set only one of"),
        ({"redis": {"enabled": False, "url": "redis://:hunter2@x:6379/0"}}, "credentials"),
        ({"redis": {"enabled": False, "auth": {"existingSecret": "r"}}}, "bundled Redis"),
        ({"dht": {"enabled": False}}, "needs swarm.initialPeers"),
        ({"fullnameOverride": "x" * 50}, "longer than 52 characters"),
        ({"model": {"id": "org/name@v1", "revision": "v2"}}, "names revision"),
        ({"model": {"id": "org/name@"}}, "nothing after '@'"),
        ({"hfCache": {"persistence": {"existingClaim": "hf"}}}, "existingClaim is set"),
        ({"gateway": {"metricsPort": 8000}}, "a port of its own"),
    ],
)
def test_values_that_cannot_work_together_fail_clearly(
    chart: helm_python.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(chart, {"swarmKey": {"existingSecret": SWARM_KEY}, **values})


# ---- roles and their arguments ---------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_each_role_runs_its_subcommand_of_the_one_image(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    roles = set()
    for workload in members(manifests[name]):
        ctr = container(workload)
        # The image's ENTRYPOINT is `swarmgate`: no command, args start with the role.
        assert "command" not in ctr
        assert ctr["args"][0] == component(workload)
        image = VALUE_SETS[name].get("image", {})
        # The tag defaults to appVersion.
        assert ctr["image"] == f"{image.get('repository', 'swarmgate')}:{image.get('tag', '0.1.0')}"
        roles.add(ctr["args"][0])
    assert roles == ROLES


def test_every_node_and_gateway_gets_every_bootstrap_address(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    objects = manifests["swarm"]
    (dht,) = members(objects, "dht")
    assert dht["spec"]["replicas"] == 2
    service = one(objects, "Service", dht["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # per-pod DNS names need a headless one
    http_port = port_named(container(dht), "http")
    assert {p["port"] for p in service["spec"]["ports"] if p["name"] == "http"} == {http_port}
    assert flag(container(dht)["args"], "--http-port") == [str(http_port)]
    expected = [
        f"http://{dht['metadata']['name']}-{i}.{service['metadata']['name']}."
        f"{NAMESPACE}.svc.cluster.local:{http_port}"
        for i in range(2)
    ] + [EXTERNAL_PEER]
    joiners = members(objects, "node") + members(objects, "gateway")
    assert len(joiners) == 4
    for workload in joiners:
        assert flag(container(workload)["args"], "--initial-peers") == expected
    # Bootstrap peers are seeds: they join only the peers given from outside the release.
    assert flag(container(dht)["args"], "--initial-peers") == [EXTERNAL_PEER]
    for url in expected[:2]:
        assert urlsplit(url).port == http_port
    # One swarm namespace for all: env, as `swarmgate dht` takes no --namespace flag.
    for workload in [dht, *joiners]:
        assert env(container(workload))["SWARMGATE_NAMESPACE"]["value"] == "team-a"


def test_node_groups_map_to_their_spans(manifests: dict[str, list[dict[str, Any]]]) -> None:
    objects = manifests["swarm"]
    groups = VALUE_SETS["swarm"]["nodes"]
    nodes = {w["metadata"]["name"]: w for w in members(objects, "node")}
    assert len(nodes) == len(groups)
    for group in groups:
        workload = nodes[f"{RELEASE}-swarmgate-node-{group['name']}"]
        assert workload["kind"] == "StatefulSet"
        args = container(workload)["args"]
        assert workload["spec"]["replicas"] == group.get("replicas", 1)
        if group["blocks"] == "auto":
            assert "--blocks" not in args
            assert flag(args, "--num-blocks") == [str(group["numBlocks"])]
            # One at a time: each "auto" pod sees the spans of those started before it.
            assert workload["spec"]["podManagementPolicy"] == "OrderedReady"
        else:
            assert flag(args, "--blocks") == [group["blocks"]]
            assert "--num-blocks" not in args
            assert workload["spec"]["podManagementPolicy"] == "Parallel"
        assert flag(args, "--dtype") == [group.get("dtype", "auto")]
        assert flag(args, "--quant") == [group.get("quant", "none")]
        assert flag(args, "--adapters") == group.get("adapters", [])
    head = container(nodes[f"{RELEASE}-swarmgate-node-head"])
    assert flag(head["args"], "--cache-bytes") == [str(3 * 2**30)]
    assert flag(head["args"], "--announce-period") == ["5"]  # extraArgs come last and win
    assert head["resources"]["limits"]["memory"] == "8Gi"
    assert head["resources"]["requests"]["cpu"] == "1"  # the rest of nodeDefaults stays
    pod = nodes[f"{RELEASE}-swarmgate-node-head"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu-large"}
    assert pod["tolerations"][0]["key"] == "llm"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_nodes_outlive_their_drain(manifests: dict[str, list[dict[str, Any]]], name: str) -> None:
    for workload in members(manifests[name], "node"):
        (drain,) = flag(container(workload)["args"], "--drain-timeout")
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > float(drain), workload["metadata"]["name"]


def test_stored_responses_are_kept_as_long_as_the_cli_would(
    chart: helm_python.Chart,
    manifests: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SWARMGATE_RESPONSE_TTL", raising=False)
    (gateway,) = members(manifests["defaults"], "gateway")
    args = container(gateway)["args"]
    assert flag(args, "--response-ttl") == ["86400"]
    at = args.index("--response-ttl")
    parse = build_parser().parse_args
    assert parse(args).response_ttl == parse(args[:at] + args[at + 2 :]).response_ttl
    for ttl, arg in ((3600, "3600"), (0.5, "0.5")):
        values = {"swarmKey": {"existingSecret": SWARM_KEY}, "gateway": {"responseTtlSeconds": ttl}}
        templates = render(chart, values)
        (deployment,) = [
            yaml.safe_load(manifest)
            for path, manifest in templates.items()
            if path.endswith("deployment-gateway.yaml")
        ]
        args = container(deployment)["args"]
        assert flag(args, "--response-ttl") == [arg]
        assert parse(args).response_ttl == ttl


def test_a_group_may_turn_off_what_the_defaults_turn_on(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    # sprig's merge would skip false and 0; the chart's own merge keeps them.
    spare = one(manifests["swarm"], "StatefulSet", f"{RELEASE}-swarmgate-node-spare")
    assert "volumeClaimTemplates" not in spare["spec"]
    assert "emptyDir" in volume(spare, "identity")
    tail = one(manifests["swarm"], "StatefulSet", f"{RELEASE}-swarmgate-node-tail")
    assert tail["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 150


# ---- ports and probes ------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_services_reach_declared_container_ports(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = manifests[name]
    services = of_kind(objects, "Service")
    assert services
    for service in services:
        (target,) = pods_selected(objects, service["spec"]["selector"])
        ctr = container(target)
        for port in service["spec"]["ports"]:
            assert port_named(ctr, port["targetPort"]) == port["port"], service["metadata"]
    for workload in of_kind(objects, "StatefulSet"):
        governing = one(objects, "Service", workload["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"
        assert pods_selected(objects, governing["spec"]["selector"]) == [workload]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_args_listen_where_the_ports_are_declared(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = manifests[name]
    for workload in members(objects, "dht") + members(objects, "node"):
        ctr = container(workload)
        p2p = port_named(ctr, "p2p")
        (listen,) = flag(ctr["args"], "--host-maddrs")
        (announce,) = flag(ctr["args"], "--announce-maddrs")
        assert tcp_port(listen) == tcp_port(announce) == p2p
        # The announced address is the pod's own, from the downward API.
        assert announce.startswith("/ip4/$(POD_IP)/")
        assert env(ctr)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    for workload in members(objects, "node"):
        ctr = container(workload)
        assert flag(ctr["args"], "--metrics-port") == [str(port_named(ctr, "metrics"))]
        assert flag(ctr["args"], "--metrics-host") == ["0.0.0.0"]
    for workload in members(objects, "gateway"):
        ctr = container(workload)
        assert flag(ctr["args"], "--port") == [str(port_named(ctr, "http"))]
        assert flag(ctr["args"], "--host") == ["0.0.0.0"]
        assert flag(ctr["args"], "--metrics-port") == [str(port_named(ctr, "metrics"))]
        assert flag(ctr["args"], "--metrics-host") == ["0.0.0.0"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_has_probes_on_its_own_ports(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    for workload in workloads(manifests[name]):
        ctr = container(workload)
        assert "readinessProbe" in ctr and "livenessProbe" in ctr, ctr["name"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = ctr.get(kind, {})
            for action in ("httpGet", "tcpSocket"):
                if action in probe:
                    port_named(ctr, probe[action]["port"])
        if component(workload) in ROLES:
            assert "startupProbe" in ctr  # loading and joining take a while


def http_path(ctr: dict[str, Any], kind: str) -> str:
    return ctr[kind]["httpGet"]["path"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_ask_each_role_the_right_question(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = manifests[name]
    for workload in members(objects, "gateway"):
        ctr = container(workload)
        # Ready while the swarm covers the model; alive while the process serves.
        assert http_path(ctr, "readinessProbe") == "/health"
        assert http_path(ctr, "livenessProbe") == "/health/live"
        assert http_path(ctr, "startupProbe") == "/health/live"
    for workload in members(objects, "dht"):
        ctr = container(workload)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert http_path(ctr, kind) == "/health"
            assert port_named(ctr, ctr[kind]["httpGet"]["port"]) == port_named(ctr, "http")
    for workload in members(objects, "node"):
        ctr = container(workload)
        (ready_file,) = flag(ctr["args"], "--ready-file")
        for kind in ("startupProbe", "readinessProbe"):
            assert ctr[kind]["exec"]["command"] == ["test", "-f", ready_file]
        # The ready file must sit on a writable volume (the root filesystem is read-only).
        run = mount_of(ctr, ready_file)
        assert not run.get("readOnly")
        assert "emptyDir" in volume(workload, run["name"])
        assert ctr["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_node_startup_allows_joining_and_loading(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    for workload in members(manifests["defaults"], "node"):
        probe = container(workload)["startupProbe"]
        # nodeDefaults.startupTimeoutSeconds (1800) plus swarm.joinTimeout (120).
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800 + 120


# ---- secrets ---------------------------------------------------------------------------

# Flags whose values are secrets (or, for --swarm-key, lead to one): env and files only.
SECRET_FLAGS = {"--swarm-key", "--api-key", "--redis-url", "--requirepass"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_are_never_rendered(
    rendered: dict[str, dict[str, str]], manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    assert of_kind(manifests[name], "Secret") == []
    text = "\n".join(rendered[name].values())
    assert "PRIVATE KEY" not in text
    assert "hunter2" not in text
    for workload in workloads(manifests[name]):
        ctr = container(workload)
        args = ctr.get("command", []) + ctr.get("args", [])
        assert not SECRET_FLAGS & {a.split("=")[0] for a in args}, args
        for var in ctr.get("env", []):
            if var["name"] in ("REDIS_PASSWORD", "SWARMGATE_API_KEY", "HF_TOKEN"):
                assert "secretKeyRef" in var["valueFrom"], var
            if var["name"] == "REDIS_URL" and "value" in var:
                # A literal URL carries no password; one from a Secret is expanded at start.
                assert "@" not in var["value"] or "$(REDIS_PASSWORD)@" in var["value"]


def expected_membership(values: dict[str, Any], role: str) -> tuple[str, str]:
    """The (Secret, key) a role's pods should mount: credentials.<role>, else the swarm key."""
    credential = values.get("credentials", {}).get(CREDENTIAL_ROLE[role], {})
    if credential.get("existingSecret"):
        return credential["existingSecret"], credential.get("key", "credential")
    swarm_key = values["swarmKey"]
    return swarm_key["existingSecret"], swarm_key.get("key", "swarm.key")


def secrets_of(workload: dict[str, Any]) -> set[str]:
    """Every Secret a pod can read: volumes (projected too), env and envFrom."""
    pod = pod_spec(workload)
    names = set()
    for vol in pod.get("volumes", []):
        if "secret" in vol:
            names.add(vol["secret"]["secretName"])
        for source in vol.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for ctr in pod["containers"] + pod.get("initContainers", []):
        for var in ctr.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in ctr.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


def mounted_membership(workload: dict[str, Any]) -> tuple[str, str]:
    """The (Secret, key) behind SWARMGATE_SWARM_KEY, checked to be one read-only file."""
    ctr = container(workload)
    path = env(ctr)["SWARMGATE_SWARM_KEY"]["value"]
    mount = mount_of(ctr, path)
    assert mount["readOnly"] is True
    secret = volume(workload, mount["name"])["secret"]
    assert secret["defaultMode"] == 0o400
    (item,) = secret["items"]
    assert item["path"] == Path(path).name
    return secret["secretName"], item["key"]


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if n != "open"])
def test_each_role_mounts_its_own_membership(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    values = VALUE_SETS[name]
    for workload in members(manifests[name]):
        role = component(workload)
        assert mounted_membership(workload) == expected_membership(values, role), role


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if n != "open"])
def test_gateway_pods_never_get_the_servers_secret(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    values = VALUE_SETS[name]
    server, _ = expected_membership(values, "node")
    gateway, _ = expected_membership(values, "gateway")
    for workload in members(manifests[name], "gateway"):
        readable = secrets_of(workload)
        assert gateway in readable
        if server != gateway:  # both the swarm key: the simple path, one Secret for all
            assert server not in readable
        if gateway != values.get("swarmKey", {}).get("existingSecret"):
            assert SWARM_KEY not in readable
    for workload in members(manifests[name], "node") + members(manifests[name], "dht"):
        assert server in secrets_of(workload)
        if server != gateway:
            assert gateway not in secrets_of(workload)


def test_per_role_credentials_leave_the_swarm_key_out_of_the_cluster(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    for name in ("credentials", "gpu"):
        for workload in members(manifests[name]):
            assert SWARM_KEY not in secrets_of(workload)
            role = CREDENTIAL_ROLE[component(workload)]
            secret = {"server": SERVER_CREDENTIAL, "gateway": GATEWAY_CREDENTIAL}[role]
            assert mounted_membership(workload)[0] == secret


@pytest.mark.parametrize("with_credential", ["server", "gateway"])
def test_a_role_without_a_credential_falls_back_to_the_swarm_key(
    chart: helm_python.Chart, with_credential: str
) -> None:
    own = {"server": SERVER_CREDENTIAL, "gateway": GATEWAY_CREDENTIAL}[with_credential]
    values = {
        "swarmKey": {"existingSecret": SWARM_KEY},
        "credentials": {with_credential: {"existingSecret": own}},
    }
    templates = render(chart, values)
    objects = [
        doc
        for path, text in templates.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    for workload in members(objects):
        role = component(workload)
        expected = (own, "credential") if CREDENTIAL_ROLE[role] == with_credential else None
        assert mounted_membership(workload) == (expected or (SWARM_KEY, "swarm.key")), role
    notes = templates["swarmgate/templates/NOTES.txt"]
    pods = "node and dht pods" if with_credential == "server" else "gateway pods"
    assert re.search(rf"{pods}: +a {with_credential} credential, from the Secret {own}", notes)
    other = "gateway pods" if with_credential == "server" else "node and dht pods"
    assert re.search(rf"{other}: +the swarm key itself, from the Secret {SWARM_KEY}", notes)


def test_an_open_swarm_mounts_no_key(
    rendered: dict[str, dict[str, str]], manifests: dict[str, list[dict[str, Any]]]
) -> None:
    for workload in members(manifests["open"]):
        assert "SWARMGATE_SWARM_KEY" not in env(container(workload))
    notes = rendered["open"]["swarmgate/templates/NOTES.txt"]
    assert "OPEN swarm" in notes


def test_gateway_secrets_are_referenced(manifests: dict[str, list[dict[str, Any]]]) -> None:
    objects = manifests["swarm"]
    (gateway,) = members(objects, "gateway")
    ctr = container(gateway)
    variables = env(ctr)
    key_file = variables["SWARMGATE_API_KEY_FILE"]["value"]
    assert volume(gateway, mount_of(ctr, key_file)["name"])["secret"]["secretName"] == API_KEYS
    password = variables["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": REDIS_AUTH, "key": "redis-password"}
    # Kubernetes expands $(REDIS_PASSWORD) only if it is defined before REDIS_URL.
    names = [e["name"] for e in ctr["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    redis_service = one(objects, "Service", f"{RELEASE}-swarmgate-redis")
    assert variables["REDIS_URL"]["value"] == (
        f"redis://:$(REDIS_PASSWORD)@{redis_service['metadata']['name']}:"
        f"{redis_service['spec']['ports'][0]['port']}/0"
    )


def test_bundled_redis_reads_its_password_from_a_file(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    redis = one(manifests["swarm"], "Deployment", f"{RELEASE}-swarmgate-redis")
    ctr = container(redis)
    (script,) = ctr["args"]
    assert "requirepass $$(cat /etc/redis-auth/password)" in script  # $$: no k8s expansion
    assert mount_of(ctr, "/etc/redis-auth/password")["readOnly"] is True
    assert volume(redis, "auth")["secret"]["secretName"] == REDIS_AUTH


def test_external_redis_url_comes_from_a_secret(manifests: dict[str, list[dict[str, Any]]]) -> None:
    objects = manifests["external-redis"]
    assert [w for w in workloads(objects) if component(w) == "redis"] == []
    assert of_kind(objects, "NetworkPolicy") == []
    (gateway,) = members(objects, "gateway")
    ref = env(container(gateway))["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": REDIS_URL_SECRET, "key": "redis-url"}


def test_a_plain_redis_url_is_passed_as_is(manifests: dict[str, list[dict[str, Any]]]) -> None:
    (gateway,) = members(manifests["open"], "gateway")
    url = VALUE_SETS["open"]["redis"]["url"]
    assert env(container(gateway))["REDIS_URL"] == {"name": "REDIS_URL", "value": url}


def test_bundled_redis_admits_only_the_gateways(manifests: dict[str, list[dict[str, Any]]]) -> None:
    objects = manifests["defaults"]
    (policy,) = of_kind(objects, "NetworkPolicy")
    (redis,) = pods_selected(objects, policy["spec"]["podSelector"]["matchLabels"])
    assert component(redis) == "redis"
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    (allowed,) = pods_selected(objects, peer["podSelector"]["matchLabels"])
    assert component(allowed) == "gateway"
    assert [port_named(container(redis), p["port"]) for p in rule["ports"]] == [6379]
    (gateway,) = members(objects, "gateway")
    assert (
        env(container(gateway))["REDIS_URL"]["value"] == f"redis://{RELEASE}-swarmgate-redis:6379/0"
    )


# ---- identities ------------------------------------------------------------------------


def test_dht_identities_come_one_per_pod_from_a_secret(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    (dht,) = members(manifests["swarm"], "dht")
    ctr = container(dht)
    (identity,) = flag(ctr["args"], "--identity")
    assert identity == "/etc/swarmgate/identity/dht-$(POD_INDEX).key"
    index = env(ctr)["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.labels['apps.kubernetes.io/pod-index']"
    mount = mount_of(ctr, identity)
    assert mount["readOnly"] is True
    assert volume(dht, mount["name"])["secret"]["secretName"] == DHT_IDENTITY
    assert "volumeClaimTemplates" not in dht["spec"]


@pytest.mark.parametrize("role", ["dht", "node"])
def test_identities_persist_on_a_claim_per_pod_by_default(
    manifests: dict[str, list[dict[str, Any]]], role: str
) -> None:
    for workload in members(manifests["defaults"], role):
        ctr = container(workload)
        (identity,) = flag(ctr["args"], "--identity")
        mount = mount_of(ctr, identity)
        assert not mount.get("readOnly")  # created on first start
        claim = volume(workload, mount["name"])["claim"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


# ---- security defaults -----------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_run_locked_down(manifests: dict[str, list[dict[str, Any]]], name: str) -> None:
    for workload in workloads(manifests[name]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        ctr = container(workload)
        context = ctr["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "emptyDir" in volume(workload, mount_of(ctr, "/tmp/x")["name"])
    (account,) = of_kind(manifests[name], "ServiceAccount")
    assert account["automountServiceAccountToken"] is False


# ---- gateway toggles -------------------------------------------------------------------


def test_edge_gateway_has_ingress_autoscaler_and_budget(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    objects = manifests["edge"]
    (gateway,) = members(objects, "gateway")
    service = one(objects, "Service", f"{RELEASE}-swarmgate-gateway")
    (ingress,) = of_kind(objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [
        {"hosts": ["llm.example.com"], "secretName": "llm-example-tls"}
    ]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    # The OpenAI API only: /swarm, /metrics and the API docs are not routed from outside.
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix")]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": gateway["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in gateway["spec"]  # the autoscaler owns it
    (pdb,) = of_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pods_selected(objects, pdb["spec"]["selector"]["matchLabels"]) == [gateway]


def test_optional_objects_are_off_by_default(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {o["kind"] for o in manifests["defaults"]}
    assert not kinds & {"Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert not kinds & {"ServiceMonitor", "ConfigMap"}
    (gateway,) = members(manifests["defaults"], "gateway")
    assert gateway["spec"]["replicas"] == 1


def test_node_groups_may_have_a_disruption_budget(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    objects = manifests["swarm"]
    (pdb,) = of_kind(objects, "PodDisruptionBudget")
    (spare,) = pods_selected(objects, pdb["spec"]["selector"]["matchLabels"])
    assert spare["metadata"]["name"] == f"{RELEASE}-swarmgate-node-spare"
    assert pdb["spec"]["maxUnavailable"] == 1


def test_a_model_volume_reaches_nodes_and_gateways(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    model = VALUE_SETS["edge"]["model"]
    for workload in members(manifests["edge"], "node") + members(manifests["edge"], "gateway"):
        ctr = container(workload)
        assert flag(ctr["args"], "--model") == [model["id"]]
        assert flag(ctr["args"], "--model-name") == [model["name"]]
        mount = mount_of(ctr, model["id"])
        assert mount["readOnly"] is True
        source = volume(workload, mount["name"])
        assert source["persistentVolumeClaim"] == model["volume"]["persistentVolumeClaim"]


# ---- Hub models and GPUs ---------------------------------------------------------------

HF_HOME = "/var/cache/huggingface"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def gpus(ctr: dict[str, Any]) -> tuple[Any, Any]:
    """The container's nvidia.com/gpu (request, limit); None where absent."""
    resources = ctr.get("resources", {})
    return (
        resources.get("requests", {}).get("nvidia.com/gpu"),
        resources.get("limits", {}).get("nvidia.com/gpu"),
    )


def span(workload: dict[str, Any]) -> tuple[int, int]:
    (blocks,) = flag(container(workload)["args"], "--blocks")
    start, end = blocks.split(":")
    return int(start), int(end)


def test_the_gpu_example_puts_every_pod_on_a_gpu(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    objects = manifests["gpu"]
    nodes = members(objects, "node")
    (gateway,) = members(objects, "gateway")
    assert len(nodes) == 4
    for workload in [*nodes, gateway]:
        where = workload["metadata"]["name"]
        pod, ctr = pod_spec(workload), container(workload)
        # One whole GPU each: extended resources are not overcommitted, request == limit.
        assert gpus(ctr) == (1, 1), where
        assert pod["runtimeClassName"] == "nvidia", where
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, where
        assert GPU_TOLERATION in pod["tolerations"], where
        assert env(ctr)["SWARMGATE_DEVICE"] == {"name": "SWARMGATE_DEVICE", "value": "cuda"}
    # The bootstrap peers serve no model: no GPU held idle for them.
    for workload in members(objects, "dht"):
        assert gpus(container(workload)) == (None, None)
        assert "runtimeClassName" not in pod_spec(workload)


def test_the_gpu_example_splits_llama_70b_into_four_spans(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    nodes = members(manifests["gpu"], "node")
    spans = sorted(span(n) for n in nodes)
    assert spans == [(0, 20), (20, 40), (40, 60), (60, 80)]  # Llama-3.1-70B: 80 blocks
    for workload in nodes:
        args = container(workload)["args"]
        assert flag(args, "--dtype") == ["auto"]  # bfloat16 on CUDA
        # No --cache-bytes: on its own GPU a node sizes its cache from the memory left free.
        assert "--cache-bytes" not in args
        assert workload["spec"]["podManagementPolicy"] == "Parallel"
    (gateway,) = members(manifests["gpu"], "gateway")
    assert env(container(gateway))["SWARMGATE_DTYPE"]["value"] == "auto"


def test_the_readme_shows_the_gpu_example() -> None:
    readme = (CHART / "README.md").read_text()
    section = readme.split("### GPU swarm", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert yaml.safe_load(block) == yaml.safe_load(GPU_EXAMPLE.read_text())
    assert "examples/gpu-llama-70b.yaml" in section


def selected_by(objects: list[dict[str, Any]], selector: str) -> list[dict[str, Any]]:
    """Workloads whose pods a kubectl label selector (`k=v` and `k in (a,b)`) picks."""
    wanted = {
        key: set(value.strip("()").split(",")) if op == "in" else {value}
        for key, op, value in re.findall(r"([\w./-]+)\s*(=|in)\s*(\([^)]*\)|[^,]+)", selector)
    }
    assert wanted, selector
    return [
        w
        for w in workloads(objects)
        if all(w["spec"]["template"]["metadata"]["labels"].get(k) in v for k, v in wanted.items())
    ]


def test_the_readme_rotation_steps_name_real_objects(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    """The commands of "Rotating and revoking credentials" act on what the chart renders,
    and never put the swarm key in a Secret."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Rotating and revoking credentials", 1)[1].split("\n## ", 1)[0]
    objects = manifests["defaults"]
    nodes = members(objects, "node")
    groups = [w["spec"]["template"]["metadata"]["labels"]["swarmgate/node-group"] for w in nodes]
    kinds = {"statefulset": "StatefulSet", "deployment": "Deployment"}
    named = set(re.findall(r"\b(statefulset|deployment)/(<release>-[-a-z<>]+)", section))
    assert {name for _, name in named} == {
        "<release>-swarmgate-dht",
        "<release>-swarmgate-node-<group>",
        "<release>-swarmgate-gateway",
    }
    for kind, name in named:
        for group in groups if "<group>" in name else [""]:
            one(objects, kinds[kind], name.replace("<release>", RELEASE).replace("<group>", group))
    selectors = [
        (quoted or bare).replace("<release>", RELEASE)
        for quoted, bare in re.findall(r" -l (?:'([^']+)'|(\S+))", section)
    ]
    assert len(selectors) == 2
    for selector in selectors:
        picked = selected_by(objects, selector)
        if "in (" in selector:  # restarting the whole swarm: every member, no Redis
            assert sorted(map(id, picked)) == sorted(map(id, members(objects)))
        else:  # the node groups
            assert sorted(map(id, picked)) == sorted(map(id, nodes))
    dht = one(objects, "Service", f"{RELEASE}-swarmgate-dht")
    ports = {p["name"]: p["port"] for p in dht["spec"]["ports"]}
    p2p, http = ports["p2p"], ports["http"]
    assert f"port-forward pod/<release>-swarmgate-dht-0 {p2p}:{p2p} {http}:{http}" in section
    assert f"/ip4/127.0.0.1/tcp/{p2p}/p2p/" in section
    for line in section.splitlines():
        if "kubectl create secret" in line:
            assert "swarm.key" not in line and "swarm-2.key" not in line, line
    assert "swarmgate revoke --swarm-key swarm.key" in section
    assert "--dry-run=client -o yaml | kubectl apply -f -" in section


@pytest.mark.parametrize("role", ["node", "gateway"])
def test_hub_models_reach_nodes_and_gateways(
    manifests: dict[str, list[dict[str, Any]]], role: str
) -> None:
    model = VALUE_SETS["gpu"]["model"]
    for workload in members(manifests["gpu"], role):
        ctr = container(workload)
        assert flag(ctr["args"], "--model") == ["meta-llama/Llama-3.1-70B-Instruct"]
        assert flag(ctr["args"], "--model-name") == [model["name"]]
        variables = env(ctr)
        assert variables["SWARMGATE_REVISION"] == {
            "name": "SWARMGATE_REVISION",
            "value": HF_REVISION,
        }
        # The token from its Secret, never as a value.
        token = variables["HF_TOKEN"]
        assert "value" not in token
        assert token["valueFrom"]["secretKeyRef"] == {"name": HF_TOKEN_SECRET, "key": "token"}
        # HF_HOME on a writable volume of its own (the root filesystem is read-only).
        assert variables["HF_HOME"] == {"name": "HF_HOME", "value": HF_HOME}
        mount = mount_of(ctr, f"{HF_HOME}/hub/models--meta-llama--Llama-3.1-70B-Instruct")
        assert mount["mountPath"] == HF_HOME
        assert not mount.get("readOnly")
        assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
        source = volume(workload, mount["name"])
        if role == "node":
            # A claim per pod: a restarted pod finds the files of its blocks again.
            claim = source["claim"]
            assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
            assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        else:
            # A Deployment has no claim per pod: its cache lives as long as the pod.
            assert source["emptyDir"] == {}


def test_hub_downloads_may_take_the_startup_budget(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    values = VALUE_SETS["gpu"]
    join = 120  # swarm.joinTimeout's default
    for workload in members(manifests["gpu"], "node") + members(manifests["gpu"], "gateway"):
        probe = container(workload)["startupProbe"]
        budget = values["nodeDefaults" if component(workload) == "node" else "gateway"][
            "startupTimeoutSeconds"
        ]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= budget + join


@pytest.mark.parametrize("role", ["node", "gateway"])
def test_defaults_hold_no_gpu_and_no_hub_secrets(
    manifests: dict[str, list[dict[str, Any]]], role: str
) -> None:
    for workload in members(manifests["defaults"], role):
        pod, ctr = pod_spec(workload), container(workload)
        assert gpus(ctr) == (None, None)
        assert "runtimeClassName" not in pod
        assert "nodeSelector" not in pod and "tolerations" not in pod
        variables = env(ctr)
        assert variables["SWARMGATE_DEVICE"]["value"] == "auto"
        assert not {"HF_TOKEN", "SWARMGATE_REVISION"} & set(variables)
        # Still a writable cache, per pod and gone with it, so that a Hub model works.
        assert variables["HF_HOME"]["value"] == HF_HOME
        assert volume(workload, mount_of(ctr, f"{HF_HOME}/hub")["name"])["emptyDir"] == {}
        claims = workload["spec"].get("volumeClaimTemplates", [])
        assert "hf-cache" not in [c["metadata"]["name"] for c in claims]
    if role == "node":
        (gateway,) = members(manifests["defaults"], "gateway")
        assert env(container(gateway))["SWARMGATE_DTYPE"]["value"] == "auto"


def test_an_existing_claim_is_one_cache_for_every_pod(chart: helm_python.Chart) -> None:
    values = {
        "swarmKey": {"existingSecret": SWARM_KEY},
        "model": {"id": "Qwen/Qwen2.5-7B-Instruct@v1.0"},
        "hfCache": {
            "mountPath": "/hf",
            "persistence": {"enabled": True, "existingClaim": "hf-shared"},
        },
    }
    objects = [
        doc
        for path, text in render(chart, values).items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    joiners = members(objects, "node") + members(objects, "gateway")
    assert len(joiners) == 3
    for workload in joiners:
        ctr = container(workload)
        assert env(ctr)["HF_HOME"]["value"] == "/hf"
        source = volume(workload, mount_of(ctr, "/hf/hub")["name"])
        assert source["persistentVolumeClaim"] == {"claimName": "hf-shared"}
        claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
        assert "hf-cache" not in claims
        # The revision stays in the id, where the CLI reads it: no second one in env.
        assert flag(ctr["args"], "--model") == ["Qwen/Qwen2.5-7B-Instruct@v1.0"]
        assert "SWARMGATE_REVISION" not in env(ctr)
    notes = render(chart, values)["swarmgate/templates/NOTES.txt"]
    # The name `swarmgate` gives a Hub model without --model-name: its repository id.
    assert '"model": "Qwen/Qwen2.5-7B-Instruct"' in notes


@pytest.mark.parametrize("name", ["defaults", "swarm", "edge", "gpu"])
@pytest.mark.parametrize("role", ["node", "gateway"])
def test_the_cli_reads_what_the_chart_passes(
    manifests: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    role: str,
) -> None:
    """Args and env as the container gets them parse with `swarmgate` itself: a device,
    dtype or revision the CLI would refuse (or not read) fails here, not in a pod."""
    for variable in list(os.environ):
        if variable.startswith("SWARMGATE_"):
            monkeypatch.delenv(variable)
    values = VALUE_SETS[name]
    for workload in members(manifests[name], role):
        ctr = container(workload)
        for variable in ctr.get("env", []):
            if variable["name"].startswith("SWARMGATE_") and "value" in variable:
                monkeypatch.setenv(variable["name"], variable["value"])
        args = build_parser().parse_args(ctr["args"])
        model = values.get("model", {})
        assert args.model == model.get("id", "smollm2")
        assert args.revision == (model.get("revision") or None)
        settings = (
            values.get("gateway", {}) if role == "gateway" else values.get("nodeDefaults", {})
        )
        assert args.device == settings.get("device", "auto")
        if role == "gateway":
            assert args.dtype == settings.get("dtype", "auto")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_gateways_serve_open_only_without_an_api_key_secret(
    manifests: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """On 0.0.0.0 a gateway without keys refuses to start unless told --allow-open: the
    chart says it exactly when no API-key Secret is configured, and the CLI then starts."""
    for variable in list(os.environ):
        if variable.startswith("SWARMGATE_"):
            monkeypatch.delenv(variable)
    keyed = bool(VALUE_SETS[name].get("gateway", {}).get("apiKeys", {}).get("existingSecret"))
    (gateway,) = members(manifests[name], "gateway")
    ctr = container(gateway)
    assert ("--allow-open" in ctr["args"]) is not keyed
    assert ("SWARMGATE_API_KEY_FILE" in env(ctr)) is keyed
    args = build_parser().parse_args(ctr["args"])
    keys = ("a key from the Secret",) if keyed else ()
    check_exposure("gateway", args.host, keys, args.allow_open)  # no SystemExit
    with pytest.raises(SystemExit, match="--allow-open"):
        check_exposure("gateway", args.host, (), allow_open=False)


def test_the_default_ingress_routes_the_openai_api_only(chart: helm_python.Chart) -> None:
    values = {"swarmKey": {"existingSecret": SWARM_KEY}, "gateway": {"ingress": {"enabled": True}}}
    text = render(chart, values)["swarmgate/templates/ingress-gateway.yaml"]
    (ingress,) = [doc for doc in yaml.safe_load_all(text) if doc]
    for rule in ingress["spec"]["rules"]:
        assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix")]


def test_per_key_caps_and_the_queue_timeout_reach_the_gateway(chart: helm_python.Chart) -> None:
    def gateway_args(gateway: dict[str, Any]) -> list[str]:
        values = {"swarmKey": {"existingSecret": SWARM_KEY}, "gateway": gateway}
        objects = [
            doc
            for path, text in render(chart, values).items()
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            if doc
        ]
        (workload,) = members(objects, "gateway")
        return list(container(workload)["args"])

    defaults = gateway_args({})
    # No cap of the chart's own: the gateway's default (with keys, --max-concurrent).
    assert "--max-concurrent-per-key" not in defaults
    assert flag(defaults, "--queue-timeout") == ["5"]
    assert build_parser().parse_args(defaults).max_concurrent_per_key is None
    capped = gateway_args({"maxConcurrentPerKey": 3, "queueTimeout": 0.5})
    assert flag(capped, "--max-concurrent-per-key") == ["3"]
    assert flag(capped, "--queue-timeout") == ["0.5"]


# ---- metrics ---------------------------------------------------------------------------


def dashboard_queries(dashboard: Any) -> Iterator[str]:
    """Every PromQL string of a Grafana dashboard: targets' `expr`, variables' `query`."""
    if isinstance(dashboard, dict):
        for key, value in dashboard.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(dashboard, list):
        for item in dashboard:
            yield from dashboard_queries(item)


def test_the_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "swarmgate.json").read_text())
    queries = list(dashboard_queries(dashboard))
    exprs = [q for q in queries if "rate(" in q or "swarmgate_" in q]
    assert len(exprs) >= 15
    used = {m for q in queries for m in re.findall(r"\bswarmgate_[a-z_]+", q)}
    histogram_series = {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    known = GATEWAY_METRICS | NODE_METRICS | histogram_series
    assert used - known == set()
    # A histogram is queried through its buckets, never by its bare name.
    assert used & HISTOGRAMS == set()
    # Every metric shows up somewhere: the dashboard covers what the swarm exports.
    covered = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert covered == GATEWAY_METRICS | NODE_METRICS | HISTOGRAMS
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"


def test_the_dashboard_configmap_ships_the_file(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    (configmap,) = of_kind(manifests["swarm"], "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["swarmgate.json"])
    assert shipped == json.loads((CHART / "dashboards" / "swarmgate.json").read_text())


def test_service_monitors_scrape_gateways_and_nodes(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    objects = manifests["swarm"]
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {
        f"{RELEASE}-swarmgate-gateway",
        f"{RELEASE}-swarmgate-node",
    }
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s for s in of_kind(objects, "Service") if selects(selector, s["metadata"]["labels"])
        ]
        assert services
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] == "metrics"  # never a gateway's API port, which wants a key
        assert "bearerTokenSecret" not in endpoint
        for service in services:
            assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
            assert service["spec"]["clusterIP"] == "None"  # inside the cluster only
    assert len([s for s in of_kind(objects, "Service") if "node-" in s["metadata"]["name"]]) == 3
    gateway_monitor = one(objects, "ServiceMonitor", f"{RELEASE}-swarmgate-gateway")
    selector = gateway_monitor["spec"]["selector"]["matchLabels"]
    (scraped,) = [
        s for s in of_kind(objects, "Service") if selects(selector, s["metadata"]["labels"])
    ]
    assert scraped["metadata"]["name"] == f"{RELEASE}-swarmgate-gateway-metrics"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_gateway_metrics_stay_off_the_public_service_and_ingress(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    objects = manifests[name]
    (gateway,) = members(objects, "gateway")
    metrics_port = port_named(container(gateway), "metrics")
    public = one(objects, "Service", f"{RELEASE}-swarmgate-gateway")
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]
    metrics = one(objects, "Service", f"{RELEASE}-swarmgate-gateway-metrics")
    assert metrics["spec"]["clusterIP"] == "None" and "type" not in metrics["spec"]
    assert metrics["spec"]["ports"] == [
        {"name": "metrics", "port": metrics_port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert pods_selected(objects, metrics["spec"]["selector"]) == [gateway]
    for ingress in of_kind(objects, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == public["metadata"]["name"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_scrape_annotations_name_the_metrics_port(
    manifests: dict[str, list[dict[str, Any]]], name: str
) -> None:
    for workload in members(manifests[name], "node") + members(manifests[name], "gateway"):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        # Gateways too: their API port wants an API key for /metrics when keys are set.
        assert annotations["prometheus.io/port"] == str(port_named(container(workload), "metrics"))


# ---- NOTES.txt -------------------------------------------------------------------------


def test_notes_show_how_to_call_the_api(rendered: dict[str, dict[str, str]]) -> None:
    notes = rendered["defaults"]["swarmgate/templates/NOTES.txt"]
    service = f"{RELEASE}-swarmgate-gateway"
    assert f"http://{service}.{NAMESPACE}.svc.cluster.local:8000/v1" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{service} 8000:8000" in notes
    assert "curl -N http://127.0.0.1:8000/v1/chat/completions" in notes
    assert '"stream": true' in notes and '"model": "smollm2"' in notes
    assert 'base_url="http://127.0.0.1:8000/v1"' in notes
    assert "Authorization" not in notes  # no API keys configured: no header to send
    assert "WARNING: no gateway.apiKeys.existingSecret: the gateways run with --allow-open" in notes


def test_notes_say_which_membership_each_role_got(rendered: dict[str, dict[str, str]]) -> None:
    notes = rendered["credentials"]["swarmgate/templates/NOTES.txt"]
    assert re.search(
        rf"node and dht pods: +a server credential, from the Secret {SERVER_CREDENTIAL} "
        r"\(key credential\)",
        notes,
    )
    assert re.search(
        rf"gateway pods: +a gateway credential, from the Secret {GATEWAY_CREDENTIAL} "
        r"\(key gateway\.cred\)",
        notes,
    )
    assert "swarm key itself" not in notes
    assert "Rotating and revoking credentials" in notes
    notes = rendered["defaults"]["swarmgate/templates/NOTES.txt"]
    for pods in ("node and dht pods", "gateway pods"):
        assert re.search(rf"{pods}: +the swarm key itself, from the Secret {SWARM_KEY}", notes)
    assert "set credentials.gateway.existingSecret for a gateway credential" in notes
    assert (
        "Swarm membership: none, an open swarm" in rendered["open"]["swarmgate/templates/NOTES.txt"]
    )


def test_notes_warn_of_gateways_without_shared_redis(chart: helm_python.Chart) -> None:
    values = {"swarmKey": {"existingSecret": SWARM_KEY}, "redis": {"enabled": False}}
    alone = render(chart, values)["swarmgate/templates/NOTES.txt"]
    assert "without Redis" not in alone
    several = render(chart, {**values, "gateway": {"replicas": 2}})
    assert "several gateways without Redis" in several["swarmgate/templates/NOTES.txt"]


def test_notes_follow_the_ingress_and_api_keys(rendered: dict[str, dict[str, str]]) -> None:
    notes = rendered["edge"]["swarmgate/templates/NOTES.txt"]
    assert "https://llm.example.com/v1" in notes  # TLS covers the host
    assert '-H "Authorization: Bearer $SWARMGATE_API_KEY"' in notes
    assert '"model": "smollm2-360m"' in notes
    assert 'api_key=os.environ["SWARMGATE_API_KEY"]' in notes
    assert f"get secret {API_KEYS} -o jsonpath='{{.data.api-keys}}'" in notes
    assert "WARNING" not in notes
