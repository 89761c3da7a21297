"""Offline checks of deploy/: no Kubernetes, no Docker, no network.

- The RayCluster validates against KubeRay's CRD schema once the API server's defaults are
  filled in, and a broken one is rejected with a message that names the offending field; so does
  the RayCluster with GCS fault tolerance (raycluster.yaml merged with gcs-ft-patch.yaml).
- The commands the manifests and the Dockerfile run parse with our own CLI parser.
- What runs where: the Ray resources that `--router-resource`/`--worker-resource` name are carried
  by the right worker groups, in the form both the Ray autoscaler and `ray start` read; the
  Services select the router pods and target ports those pods expose.
- The Grafana dashboard uses only the metric names the project exports.

kuberay_raycluster_schema.json (beside this file) is the openAPIV3Schema of KubeRay 1.7's
ray.io/v1 RayCluster (from ray-operator/config/crd/bases/, Apache-2.0, descriptions removed),
copied from the project's shared/kuberay/ray.io_v1_schemas.min.json so that the tests need
nothing outside the repository.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
SCHEMA_FILE = Path(__file__).with_name("kuberay_raycluster_schema.json")

# Every metric the dashboard may use: our ray.util.metrics names as Prometheus sees them
# (Ray adds the `ray_` prefix), with their tags. The one list of them in the tests.
METRICS = {
    "ray_moe_serve_expert_tokens_total": ("layer", "expert"),  # counter
    "ray_moe_serve_expert_replicas": ("layer", "expert"),  # gauge
    "ray_moe_serve_worker_tokens_per_second": ("worker",),  # gauge
    "ray_moe_serve_workers": (),  # gauge
    "ray_moe_serve_balancedness": (),  # gauge
    "ray_moe_serve_plan_version": (),  # gauge
    "ray_moe_serve_rebalances_total": ("reason",),  # counter
    "ray_moe_serve_plans_dropped_total": ("reason",),  # counter
    "ray_moe_serve_requests_total": ("protocol", "code"),  # counter
    "ray_moe_serve_queue_depth": ("router",),  # gauge
    "ray_moe_serve_kv_slots_used": ("router",),  # gauge
    "ray_moe_serve_kv_slots": ("router",),  # gauge
    "ray_moe_serve_time_to_first_token_seconds_bucket": ("le", "router", "protocol"),  # histogram
    "ray_moe_serve_inter_token_latency_seconds_bucket": ("le", "router", "protocol"),  # histogram
    "ray_moe_serve_generated_tokens_total": ("router", "protocol"),  # counter
}

GRPC_PORT_NAME = "grpc"
HTTP_PORT_NAME = "http"


# --- helpers: YAML, schema defaults and validation ---------------------------------------------

def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def the_doc(path: Path, kind: str) -> dict:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


@pytest.fixture()
def raycluster() -> dict:
    return the_doc(KUBERAY / "raycluster.yaml", "RayCluster")


def apply_defaults(schema: dict, value):
    """Fill in `default`s the way the API server does before it validates a custom resource:
    only inside objects that are present, walking properties, items and additionalProperties."""
    value = copy.deepcopy(value)

    def walk(s: dict, v):
        if isinstance(v, dict):
            for name, sub in s.get("properties", {}).items():
                if name not in v and "default" in sub:
                    v[name] = copy.deepcopy(sub["default"])
                if name in v:
                    walk(sub, v[name])
            extra = s.get("additionalProperties")
            if isinstance(extra, dict):
                for name in set(v) - set(s.get("properties", {})):
                    walk(extra, v[name])
        elif isinstance(v, list) and isinstance(s.get("items"), dict):
            for item in v:
                walk(s["items"], item)

    walk(schema, value)
    return value


def field_path(parts) -> str:
    """`spec.workerGroupSpecs[0].rayStartParams.num-cpus` from jsonschema's path deque."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def schema_errors(schema: dict, doc: dict, *, defaults: bool = True) -> list[str]:
    """One line per violation, `<field path>: <message>`, for a RayCluster manifest."""
    validator = jsonschema.Draft7Validator(schema)
    instance = apply_defaults(schema, doc) if defaults else doc
    errors = [f"{field_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    if not doc.get("metadata", {}).get("name"):  # the schema leaves metadata to the API server
        errors.append("metadata.name: a RayCluster needs a name")
    return sorted(errors)


# --- helpers: containers, scripts, CLI ---------------------------------------------------------

def head_container(rc: dict) -> dict:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]  # KubeRay: the Ray container is first


def worker_group(rc: dict, name: str = "expert-workers") -> dict:
    groups = {g["groupName"]: g for g in rc["spec"].get("workerGroupSpecs", [])}
    assert name in groups, f"no worker group {name!r}; groups: {sorted(groups)}"
    return groups[name]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def head_settings(raycluster, monkeypatch):
    """ClusterSettings as the head's `moe-serve serve` sees them (its MOE_SERVE_* environment)."""
    from cluster.settings import ClusterSettings

    for name, value in env_of(head_container(raycluster)).items():
        if name.startswith("MOE_SERVE_"):
            monkeypatch.setenv(name, value)
    return ClusterSettings()


def shell_script(container: dict) -> str:
    """The script of a `bash -c` container (command + args as Kubernetes runs them)."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:1] in (["/bin/bash"], ["bash"]), f"{container['name']}: expected a bash command, got {argv[:1]}"
    flags = [a for a in argv[1:] if a.startswith("-")]
    assert any("c" in f.lstrip("-") for f in flags if f != "--"), f"{container['name']}: bash without -c: {argv}"
    script = [a for a in argv[1:] if not a.startswith("-")]
    assert len(script) == 1, f"{container['name']}: expected one script argument, got {script}"
    return script[0]


def bash_syntax_ok(script: str) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, f"bash -n: {done.stderr}"


def invocations(script: str, program: str = "moe-serve") -> list[list[str]]:
    """argv (program name stripped) of every simple command of `script` that runs `program`."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set("();<>|&"):  # a control operator ends a simple command
                if command[:1] == ["exec"]:
                    command = command[1:]
                if command[:1] == [program]:
                    found.append(command[1:])
                command = []
            else:
                command.append(token)
    return found


def parse_cli(argv: list[str]):
    """`moe-serve argv...` through the real parser; a parse error fails the test with argparse's message."""
    from cluster.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pass
    pytest.fail(f"`moe-serve {shlex.join(argv)}` does not parse: {err.getvalue().strip().splitlines()[-1]}")


def serve_invocation(rc: dict) -> list[str]:
    calls = invocations(shell_script(head_container(rc)))
    assert len(calls) == 1, f"the head should run moe-serve exactly once, found {calls}"
    return calls[0]


def serve_args(rc: dict):
    return parse_cli(serve_invocation(rc))


def group_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def custom_resources(group: dict) -> dict[str, int]:
    """The Ray custom resources a group's pods carry, from rayStartParams `resources`.

    Two programs read that string and both must get the same JSON object out of it:
    - the Ray autoscaler (ray.autoscaler._private.kuberay, `_get_custom_resources`) drops its first and
      last character and every backslash, then parses JSON whose values must be whole numbers; it is
      how the autoscaler knows which group to grow for a pending request;
    - `ray start`, which gets it as `--resources=<value>` after bash has evaluated KubeRay's generated
      command (our containers run `eval "$KUBERAY_GEN_RAY_START_CMD"`).
    """
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    assert len(raw) > 2 and raw[0] == raw[-1] == '"', f"resources {raw!r}: the autoscaler expects it in double quotes"
    by_autoscaler = json.loads(raw[1:-1].replace("\\", ""))
    assert isinstance(by_autoscaler, dict) and all(
        isinstance(k, str) and type(v) is int for k, v in by_autoscaler.items()), f"resources {raw!r}"
    if shutil.which("bash") is not None:
        done = subprocess.run(["bash", "-c", 'eval "set -- --resources=$1"; printf %s "$1"', "bash", raw],
                              capture_output=True, text=True, check=True)
        flag = done.stdout
        assert flag.startswith("--resources="), flag
        assert json.loads(flag.removeprefix("--resources=")) == by_autoscaler, f"ray start would get {flag!r}"
    return by_autoscaler


def ray_cpus(group: dict) -> float:
    """Ray CPUs of a group's pod: num-cpus, else (as KubeRay does) the container's CPU limit rounded up."""
    params = group.get("rayStartParams", {})
    if "num-cpus" in params:
        return float(params["num-cpus"])
    limit = str(group_container(group)["resources"]["limits"]["cpu"])
    return float(math.ceil(float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)))


def pod_labels(rc: dict, group: dict, node_type: str = "worker") -> dict[str, str]:
    """The labels a pod of `group` has: its template's, plus those KubeRay adds to every Ray pod (KubeRay
    keeps a template's own value of app.kubernetes.io/name)."""
    kuberay = {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": node_type,
               "ray.io/group": group.get("groupName", "headgroup"), "ray.io/is-ray-node": "yes",
               "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    return {**kuberay, **group["template"]["metadata"].get("labels", {})}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def groups_selected(rc: dict, selector: dict[str, str]) -> list[str]:
    """Names of the groups (head: 'head') whose pods `selector` matches."""
    found = ["head"] if selects(selector, pod_labels(rc, rc["spec"]["headGroupSpec"], "head")) else []
    return found + [g["groupName"] for g in rc["spec"]["workerGroupSpecs"] if selects(selector, pod_labels(rc, g))]


def container_port(container: dict, target) -> int:
    """The containerPort a Service's targetPort (a name or a number) reaches in `container`."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(target, int):
        assert target in ports.values(), f"{container['name']} does not expose port {target}"
        return target
    assert target in ports, f"{container['name']} has no port named {target!r}; it has {sorted(ports)}"
    return ports[target]


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, what `kubectl patch --type merge` applies: objects merge key by key,
    null deletes, anything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@pytest.fixture()
def routers(raycluster) -> dict:
    return worker_group(raycluster, "routers")


@pytest.fixture()
def gcs_ft_patch() -> dict:
    (patch,) = load_docs(KUBERAY / "gcs-ft-patch.yaml")
    return patch


# --- RayCluster: schema --------------------------------------------------------------------

def test_stored_schema_is_kuberay_raycluster(schema):
    assert "KubeRay" in schema["$comment"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["headGroupSpec"]
    assert spec["properties"]["headGroupSpec"]["properties"]["rayStartParams"]["additionalProperties"] == {
        "type": "string"}


def test_raycluster_validates_against_kuberay_schema(schema, raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert schema_errors(schema, raycluster) == []


def test_api_server_defaults_fill_missing_replica_bounds(schema, raycluster):
    group = raycluster["spec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]

    raw = schema_errors(schema, raycluster, defaults=False)
    assert "spec.workerGroupSpecs[0]: 'minReplicas' is a required property" in raw
    assert "spec.workerGroupSpecs[0]: 'maxReplicas' is a required property" in raw

    assert schema_errors(schema, raycluster) == []
    defaulted = apply_defaults(schema, raycluster)["spec"]["workerGroupSpecs"][0]
    assert (defaulted["minReplicas"], defaulted["maxReplicas"]) == (0, 2147483647)
    assert "networkPolicy" not in apply_defaults(schema, raycluster)["spec"], "defaults only inside present objects"


BROKEN = {
    # YAML reads an unquoted number as an int; rayStartParams are strings.
    "unquoted_ray_start_param": (
        ('num-cpus: "0"', "num-cpus: 0"),
        "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
    "missing_group_name": (
        ("- groupName: expert-workers", "- groupname: expert-workers"),
        "spec.workerGroupSpecs[0]: 'groupName' is a required property"),
    "unknown_autoscaler_version": (
        ("version: v2", "version: v3"),
        "spec.autoscalerOptions.version: 'v3' is not one of ['v1', 'v2']"),
    "port_as_string": (
        ("containerPort: 50051}", 'containerPort: "50051"}'),
        "spec.workerGroupSpecs[1].template.spec.containers[0].ports[0].containerPort: '50051' is not of type 'integer'"),
    "resources_as_a_map": (
        ("""resources: '"{\\"moe_serve_router\\": 1}"'""", "resources: {moe_serve_router: 1}"),
        "spec.workerGroupSpecs[1].rayStartParams.resources: {'moe_serve_router': 1} is not of type 'string'"),
}


@pytest.mark.parametrize("edit, expected", BROKEN.values(), ids=BROKEN.keys())
def test_broken_manifest_is_rejected_naming_the_field(schema, edit, expected):
    text = (KUBERAY / "raycluster.yaml").read_text()
    old, new = edit
    assert text.count(old) == 1, f"the manifest no longer contains {old!r} once"
    broken = next(d for d in yaml.safe_load_all(text.replace(old, new)) if d and d.get("kind") == "RayCluster")
    assert expected in schema_errors(schema, broken)


def test_ray_start_params_are_strings(raycluster):
    groups = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams.{key} = {value!r} must be a string"


# --- RayCluster: what runs where ------------------------------------------------------------

def test_head_exposes_only_rays_ports(raycluster):
    ports = head_container(raycluster)["ports"]
    by_name = {p["name"]: p["containerPort"] for p in ports if "name" in p}
    assert len(by_name) == len(ports), "every head port needs a name for KubeRay's head Service to expose it"
    # No router listens on the head any more: its Service must not offer 50051/8000 to clients.
    assert by_name == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}


def test_router_pods_expose_the_ports_serve_binds(raycluster, routers):
    ports = group_container(routers)["ports"]
    by_name = {p["name"]: p["containerPort"] for p in ports if "name" in p}
    assert len(by_name) == len(ports), "the router Services target ports by name"
    assert by_name == {GRPC_PORT_NAME: 50051, HTTP_PORT_NAME: 8000, "metrics": 8080}
    args = serve_args(raycluster)
    # Each router binds --port/--http-port on its own pod (one router per pod: no counting up).
    assert (args.port, args.http_port) == (by_name[GRPC_PORT_NAME], by_name[HTTP_PORT_NAME])
    assert (args.routers or 1) == 1, "several routers per pod would bind ports the Services do not target"
    assert args.host == "0.0.0.0", "routers must bind the pod's address, not loopback"


def test_head_starts_ray_then_moe_serve_joining_it(raycluster):
    annotations = raycluster["metadata"].get("annotations", {})
    assert annotations.get("ray.io/overwrite-container-cmd") == "true", (
        "without this annotation KubeRay replaces the head's command with its own `ray start`")
    script = shell_script(head_container(raycluster))
    bash_syntax_ok(script)
    lines = script.splitlines()
    ray_line = next(i for i, line in enumerate(lines) if "$KUBERAY_GEN_RAY_START_CMD" in line and "eval" in line)
    app_line = next(i for i, line in enumerate(lines) if line.lstrip().startswith("moe-serve "))
    assert ray_line < app_line, "Ray must start before moe-serve joins it"

    args = parse_cli(serve_invocation(raycluster))
    assert args.command == "serve"
    assert args.address == "auto"
    assert args.host == "0.0.0.0"
    assert args.model and args.model.startswith("/models/")
    assert args.workers and args.workers <= worker_group(raycluster)["maxReplicas"]


def test_worker_containers_start_ray_themselves(raycluster):
    # The overwrite annotation holds for every group: without a command a worker would start nothing.
    for group in raycluster["spec"]["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        script = shell_script(container)
        bash_syntax_ok(script)
        assert "$KUBERAY_GEN_RAY_START_CMD" in script
        assert invocations(script) == [], "moe-serve runs on the head only"


def test_gpu_worker_group(raycluster):
    group = worker_group(raycluster)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert "nvidia.com/gpu" not in head_container(raycluster).get("resources", {}).get("limits", {})


def test_in_tree_autoscaling_v2(raycluster):
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["version"] == "v2"
    assert options["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0


def test_head_env_names_real_settings(raycluster, monkeypatch):
    """MOE_SERVE_* variables name ClusterSettings fields (pydantic-settings ignores unknown ones) and validate."""
    from cluster.settings import ClusterSettings

    env = {k: v for k, v in env_of(head_container(raycluster)).items() if k.startswith("MOE_SERVE_")}
    assert env, "the head sets no MOE_SERVE_* variables"
    for name, value in env.items():
        field, *nested = name.removeprefix("MOE_SERVE_").lower().split("__")
        assert field in ClusterSettings.model_fields, f"{name}: ClusterSettings has no field {field!r}"
        if nested:
            sub = ClusterSettings.model_fields[field].annotation
            assert nested[0] in sub.model_fields, f"{name}: {sub.__name__} has no field {nested[0]!r}"
        monkeypatch.setenv(name, value)
    settings = ClusterSettings()
    assert settings.worker_num_gpus == 1, "workers must ask for a GPU before any GPU pod exists"


def test_routers_run_on_the_router_group_only(raycluster, routers, monkeypatch):
    """The controller starts routers on every node with --router-resource: exactly the `routers` pods."""
    settings = head_settings(raycluster, monkeypatch)
    resource = serve_args(raycluster).router_resource
    assert resource, "without --router-resource the routers would run on the head, which no Service selects"
    carriers = [g["groupName"] for g in raycluster["spec"]["workerGroupSpecs"] if resource in custom_resources(g)]
    assert carriers == ["routers"], f"{resource} is carried by {carriers}"
    assert custom_resources(routers)[resource] >= 1
    assert resource not in custom_resources(raycluster["spec"]["headGroupSpec"])
    routers_per_pod = serve_args(raycluster).routers or 1
    assert ray_cpus(routers) >= routers_per_pod * settings.router_num_cpus, "a router pod cannot hold its routers"


def test_expert_workers_run_on_the_gpu_group_only(raycluster, monkeypatch):
    args = serve_args(raycluster)
    resource = args.worker_resource
    assert resource, "without --worker-resource an expert worker could land on a router pod"
    assert resource != args.router_resource
    carriers = [g["groupName"] for g in raycluster["spec"]["workerGroupSpecs"] if resource in custom_resources(g)]
    assert carriers == ["expert-workers"], f"{resource} is carried by {carriers}"
    assert resource not in custom_resources(raycluster["spec"]["headGroupSpec"])
    # One expert worker per GPU pod: it asks for the pod's Ray CPUs and its GPU.
    settings = head_settings(raycluster, monkeypatch)
    assert ray_cpus(worker_group(raycluster)) == settings.worker_num_cpus


def test_head_takes_no_ray_work(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the comment in raycluster.yaml says the head has no Ray CPUs"
    assert custom_resources(head) == {}


def test_expert_workers_are_reachable_from_the_routers(raycluster, monkeypatch):
    settings = head_settings(raycluster, monkeypatch)
    # Routers and expert workers on different pods: a socket or collective data plane must bind the pod's IP.
    assert settings.transport == "ray" or settings.data_plane_host == "node"


def test_head_outlives_the_drain(raycluster, monkeypatch):
    import cluster.serve

    settings = head_settings(raycluster, monkeypatch)
    stop = getattr(cluster.serve, "STOP_TIMEOUT_SECONDS", 30.0)
    grace = raycluster["spec"]["headGroupSpec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace >= settings.drain_grace_seconds + stop, "Kubernetes would SIGKILL moe-serve mid-drain"


def test_every_pod_mounts_the_models_claim_read_only(raycluster):
    pvc = the_doc(KUBERAY / "models-pvc.yaml", "PersistentVolumeClaim")
    assert set(pvc["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"}, "pods on several nodes share it"
    templates = [raycluster["spec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in raycluster["spec"]["workerGroupSpecs"])]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == pvc["metadata"]["name"]
        assert claim["readOnly"] is True


def test_every_ray_container_runs_the_same_image(raycluster):
    templates = [raycluster["spec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in raycluster["spec"]["workerGroupSpecs"])]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert len(images) == 1, f"Ray needs the same Ray and Python on every node: {images}"
    assert raycluster["spec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]


# --- Router pods: drain, readiness, Services ---------------------------------------------------

# Seconds `moe-serve drain-router` may take to join Ray (ray.init) before it asks for the drain.
JOIN_SECONDS = 30.0


def test_router_pods_drain_before_they_stop(raycluster, routers):
    hook = group_container(routers)["lifecycle"]["preStop"]["exec"]["command"]
    # An exec hook runs its argv as is: the image's ENTRYPOINT does not apply, so it names the program.
    assert dockerfile_exec_form("ENTRYPOINT") == ["moe-serve"] and hook[0] == "moe-serve"
    args = parse_cli(hook[1:])
    assert args.command == "drain-router"
    assert args.address == "auto", "the hook must join through this pod's raylet, so that it drains this node"


def test_router_pods_outlive_their_drain(raycluster, routers, monkeypatch):
    import cluster.serve

    settings = head_settings(raycluster, monkeypatch)
    hook = group_container(routers)["lifecycle"]["preStop"]["exec"]["command"]
    grace = parse_cli(hook[1:]).grace_seconds
    grace = settings.drain_grace_seconds if grace is None else grace
    stop = getattr(cluster.serve, "STOP_TIMEOUT_SECONDS", 30.0)
    period = routers["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert period >= JOIN_SECONDS + grace + stop, "Kubernetes would SIGKILL the router pod mid-drain"


def test_router_readiness_follows_the_drain(routers):
    """Ready while the router's HTTP /health says 200; it says 503 from the start of a drain."""
    container = group_container(routers)
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert container_port(container, probe["port"]) == 8000
    assert container_port(container, probe["port"]) == container_port(container, HTTP_PORT_NAME)


def test_router_group_size_is_held_by_min_replicas(raycluster, routers):
    # Nothing asks the autoscaler for router pods (routers never wait for a node), so the group's size is
    # whatever minReplicas says; replicas above it would be removed as soon as their routers retire.
    assert routers["minReplicas"] == routers["replicas"] >= 2, "one router pod would be a single point of failure"
    assert routers["maxReplicas"] >= routers["replicas"]
    assert "nvidia.com/gpu" not in group_container(routers)["resources"]["limits"], "CPU router pods by default"


ROUTER_SERVICES = {  # file -> Service name -> {targetPort: port}
    "service-routers.yaml": {"moe-serve-routers": {GRPC_PORT_NAME: 50051},
                             "moe-serve-http": {HTTP_PORT_NAME: 8000}},
    "service-api.yaml": {"moe-serve-api": {GRPC_PORT_NAME: 50051, HTTP_PORT_NAME: 8000}},
}


def router_service(name: str, file: str = "service-routers.yaml") -> dict:
    (service,) = [d for d in load_docs(KUBERAY / file) if d["kind"] == "Service" and d["metadata"]["name"] == name]
    return service


@pytest.mark.parametrize("file, name", [(f, n) for f, names in ROUTER_SERVICES.items() for n in names])
def test_service_selects_the_router_pods_and_their_ports(raycluster, routers, file, name):
    service = router_service(name, file)
    selector = service["spec"]["selector"]
    selected = groups_selected(raycluster, selector)
    assert selected == ["routers"], f"{name} selects {selected}"
    ports = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == ROUTER_SERVICES[file][name]
    for target, port in ports.items():
        assert container_port(group_container(routers), target) == port


def test_grpc_service_is_headless(routers):
    """Client-side balancing needs every router's own address from DNS, with the port it listens on."""
    service = router_service("moe-serve-routers")
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False), "draining routers must leave the DNS answer"
    for port in service["spec"]["ports"]:
        # A headless Service does no port mapping: clients dial <pod IP>:<port>.
        assert container_port(group_container(routers), port["targetPort"]) == port["port"]


def test_http_service_has_a_cluster_ip():
    service = router_service("moe-serve-http")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP" and service["spec"].get("clusterIP") != "None"


def test_documented_grpc_target_is_the_headless_service():
    """deploy/README.md's Python client compiles, balances round-robin, and dials the headless Service."""
    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "deploy/README.md has no Python example"
    service = next(d for d in load_docs(KUBERAY / "service-routers.yaml") if d["spec"].get("clusterIP") == "None")
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    for code in blocks:
        compile(code, "deploy/README.md", "exec")
    example = next(b for b in blocks if "grpc.service_config" in b)
    assert '"round_robin"' in example
    targets = re.findall(r'"dns:///([\w.-]+):(\d+)"', example)
    assert targets and all(host.split(".")[0] == service["metadata"]["name"] and int(p) == port
                           for host, p in targets)


def test_disruption_budget_covers_the_router_pods(raycluster):
    budget = the_doc(KUBERAY / "service-routers.yaml", "PodDisruptionBudget")
    assert groups_selected(raycluster, budget["spec"]["selector"]["matchLabels"]) == ["routers"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_documented_scaling_patch_names_the_router_group(raycluster):
    """deploy/README.md's json-patch addresses the group by index; its `test` op must name the right one."""
    readme = (DEPLOY / "README.md").read_text()
    tests = re.findall(r'"op":\s*"test",\s*"path":\s*"/spec/workerGroupSpecs/(\d+)/groupName",\s*"value":\s*"([\w-]+)"',
                       readme)
    assert tests, "deploy/README.md shows no json-patch of a worker group"
    groups = raycluster["spec"]["workerGroupSpecs"]
    for index, name in tests:
        assert groups[int(index)]["groupName"] == name
    ops = re.findall(r'"path":\s*"/spec/workerGroupSpecs/(\d+)/(\w+)"', readme)
    assert {field for _, field in ops} >= {"replicas", "minReplicas"}
    assert {int(i) for i, _ in ops} == {int(i) for i, _ in tests}, "every patched index is guarded by a test op"


# --- GCS fault tolerance: Redis and the patch ----------------------------------------------------

def test_gcs_ft_patch_only_adds_gcs_fault_tolerance(gcs_ft_patch):
    # A merge patch of the RayCluster: it must not carry apiVersion/kind/metadata (they would overwrite
    # the manifest's) nor any list (a merge patch replaces lists whole).
    assert set(gcs_ft_patch) == {"spec"} and set(gcs_ft_patch["spec"]) == {"gcsFaultToleranceOptions"}
    options = gcs_ft_patch["spec"]["gcsFaultToleranceOptions"]
    assert options.get("backend", "redis") == "redis"
    assert options["redisAddress"]


def test_raycluster_with_gcs_ft_validates_against_kuberay_schema(schema, raycluster, gcs_ft_patch):
    patched = merge_patch(raycluster, gcs_ft_patch)
    assert schema_errors(schema, patched) == []
    assert patched["spec"]["workerGroupSpecs"] == raycluster["spec"]["workerGroupSpecs"]
    assert patched["spec"]["gcsFaultToleranceOptions"] == gcs_ft_patch["spec"]["gcsFaultToleranceOptions"]


def test_broken_gcs_ft_patch_is_rejected_naming_the_field(schema, raycluster, gcs_ft_patch):
    broken = copy.deepcopy(gcs_ft_patch)
    broken["spec"]["gcsFaultToleranceOptions"]["redisPassword"] = "in-the-clear"
    assert ("spec.gcsFaultToleranceOptions.redisPassword: 'in-the-clear' is not of type 'object'"
            in schema_errors(schema, merge_patch(raycluster, broken)))


def test_raycluster_has_none_of_the_settings_kuberay_rejects_with_gcs_ft(raycluster):
    """KubeRay's admission refuses gcsFaultToleranceOptions next to the older ways of configuring the same."""
    annotations = raycluster["metadata"].get("annotations", {})
    assert "ray.io/ft-enabled" not in annotations and "ray.io/external-storage-namespace" not in annotations
    head = raycluster["spec"]["headGroupSpec"]
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])
    assert not {"REDIS_PASSWORD", "REDIS_USERNAME", "RAY_REDIS_ADDRESS"} & set(env_of(head_container(raycluster)))


def test_gcs_ft_patch_points_at_the_redis_manifest(gcs_ft_patch):
    options = gcs_ft_patch["spec"]["gcsFaultToleranceOptions"]
    host, _, port = options["redisAddress"].removeprefix("redis://").rpartition(":")
    docs = load_docs(KUBERAY / "redis-gcs-ft.yaml")
    service = next(d for d in docs if d["kind"] == "Service")
    assert host == service["metadata"]["name"], "the head resolves the Redis Service in its own namespace"
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]

    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = statefulset["spec"]["template"]
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    assert selects(statefulset["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    assert container_port(container, service_port["targetPort"]) == 6379
    # Redis reads its password from the same Secret.
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": ref["name"], "key": ref["key"]}


def test_redis_keeps_its_append_only_file_on_the_claim():
    docs = load_docs(KUBERAY / "redis-gcs-ft.yaml")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in config.splitlines() if line.strip() and not line.startswith("#"))
    assert settings["appendonly"] == "yes" and settings["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in settings, "the password comes from the Secret, not the ConfigMap"
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1, "KubeRay needs one Redis (a single writer of the file)"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[settings["dir"]] == claim["metadata"]["name"]
    # The container's script: it refuses the placeholder password and runs the config it writes.
    (script,) = container["args"]
    assert container["command"] == ["sh", "-c"]
    bash_syntax_ok(script)
    placeholder = next(d for d in docs if d["kind"] == "Secret")["stringData"]["password"]
    assert placeholder in script and "exec redis-server" in script


def test_every_kuberay_manifest_parses():
    files = sorted(KUBERAY.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "service-routers.yaml", "service-api.yaml",
                                       "redis-gcs-ft.yaml", "gcs-ft-patch.yaml", "models-pvc.yaml"}
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path.name} is empty"
        if path.name.endswith("-patch.yaml"):
            continue  # a patch, not an object
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document without apiVersion/kind"
            assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} without a name"


def test_tiny_model_job_runs_make_model_on_the_claim():
    job = the_doc(KUBERAY / "make-tiny-model-job.yaml", "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    assert entrypoint == ["moe-serve"] and "command" not in container
    args = parse_cli(container["args"])
    assert args.command == "make-model" and args.out_dir.startswith("/models/")
    claim = {v["name"]: v for v in pod["volumes"]}[container["volumeMounts"][0]["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == the_doc(KUBERAY / "models-pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]


# --- Dockerfile ------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, logical = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        instruction, _, rest = (logical + line).partition(" ")
        out.append((instruction.upper(), rest.strip()))
        logical = ""
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for instr, rest in dockerfile_instructions() if instr == "ARG" and "=" in rest)


def dockerfile_exec_form(instruction: str) -> list[str]:
    found = [rest for instr, rest in dockerfile_instructions() if instr == instruction]
    assert found, f"the Dockerfile has no {instruction}"
    argv = json.loads(found[-1])  # the last one wins; exec form, so no shell between Docker and moe-serve
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def test_dockerfile_base_is_a_ray_gpu_image_in_our_range():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    (base,) = [rest for instr, rest in dockerfile_instructions() if instr == "FROM"]
    for name, value in dockerfile_args().items():
        base = base.replace("${%s}" % name, value)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert match, f"unexpected base image {base}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    assert ray.specifier.contains(match[1]), f"Ray {match[1]} is outside pyproject's {ray}"
    python = f"{match[2]}.{match[3]}"
    assert Requirement(f"python{project['requires-python']}").specifier.contains(python)


def test_dockerfile_runs_as_non_root():
    users = [rest for instr, rest in dockerfile_instructions() if instr == "USER"]
    assert users, "the Dockerfile must say which user it runs as"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"


def test_dockerfile_copies_only_the_package_and_installs_it():
    copies = [shlex.split(rest) for instr, rest in dockerfile_instructions() if instr == "COPY"]
    sources = {src.rstrip("/") for argv in copies for src in [a for a in argv if not a.startswith("--")][:-1]}
    assert sources == {"pyproject.toml", "README.md", "proto", "router_service", "expert_workers", "cluster"}
    assert all((ROOT / s).exists() for s in sources)
    runs = " ".join(rest for instr, rest in dockerfile_instructions() if instr == "RUN")
    assert "pip install --no-cache-dir ." in runs
    exposed = [rest for instr, rest in dockerfile_instructions() if instr == "EXPOSE"]
    assert {"50051", "8000"} <= set(" ".join(exposed).split())


def test_dockerfile_command_parses_as_moe_serve():
    entrypoint, cmd = dockerfile_exec_form("ENTRYPOINT"), dockerfile_exec_form("CMD")
    assert entrypoint == ["moe-serve"]
    args = parse_cli(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 50051 and args.http_port == 8000


# --- Grafana dashboard -----------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                   "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are not functions, keywords or labels)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m[0].lower() in PROMQL_KEYWORDS:
            continue  # a function or an aggregation
        names.add(m[0])
    return names


def test_metric_name_extraction():
    quantile = 'histogram_quantile(0.99, sum by (le) (rate(ray_a_bucket{x=~"$c", le!="1"}[$__rate_interval])))'
    assert metric_names(quantile) == {"ray_a_bucket"}
    assert metric_names("max by (router) (ray_used) / max by (router) (ray_total)") == {"ray_used", "ray_total"}
    assert metric_names("changes(max(ray_v{c=~\"$c\"})[2m:30s]) > 0") == {"ray_v"}
    assert metric_names("sum without (instance) (typo_metric)") == {"typo_metric"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "moe-serve-dashboard.json").read_text())


# The label KubeRay's PodMonitors copy from the pod label ray.io/cluster: the RayCluster's name.
CLUSTER_LABEL = "ray_io_cluster"


def label_values_query(query: str) -> tuple[str, str]:
    """(series selector, label) of a Grafana `label_values(selector, label)` variable query."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    assert match, f"unexpected variable query {query!r}"
    return match[1], match[2]


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets, annotations and the selectors of variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            exprs.append(label_values_query(query)[0])
    return exprs


def test_dashboard_variables_list_real_labels(dashboard):
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            selector, label = label_values_query(query)
            (metric,) = metric_names(selector)
            assert label in (*METRICS[metric], CLUSTER_LABEL), f"{query}: {metric} has no label {label!r}"
            assert variable.get("allValue") == ".*", f"${variable['name']}: 'All' must also match series without it"


def test_dashboard_datasource_is_a_prometheus_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"]


def test_every_panel_has_a_datasource_and_targets(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        where = f"panel {panel['title']!r}"
        assert panel.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("targets"), f"{where} has no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{where}: a target without a query"
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}", where
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{where} is wider than the grid"


def test_dashboard_uses_exactly_our_metrics(dashboard):
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    assert used <= METRICS.keys(), f"not exported by moe-serve: {sorted(used - METRICS.keys())}"
    assert used == METRICS.keys(), f"exported but not shown: {sorted(METRICS.keys() - used)}"


def test_dashboard_groups_only_by_real_tags(dashboard):
    for expr in dashboard_exprs(dashboard):
        for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            tags = {t.strip() for t in labels.split(",") if t.strip()}
            allowed = set().union(*(set(METRICS[m]) for m in metric_names(expr)))
            assert tags <= allowed, f"{expr}: groups by {sorted(tags - allowed)}, not a tag of its metrics"


def test_latency_panels_show_p50_and_p99(dashboard):
    for histogram in ("time_to_first_token", "inter_token_latency"):
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if histogram in t["expr"]]
        quantiles = {re.match(r"histogram_quantile\(\s*([0-9.]+)", e)[1] for e in exprs}
        assert quantiles == {"0.5", "0.99"}, f"{histogram}: {quantiles}"
        assert all("by (le)" in e for e in exprs)


def test_expert_load_heat_map(dashboard):
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert any("ray_moe_serve_expert_tokens_total" in t["expr"] for p in heatmaps for t in p["targets"])
    matrices = [p for p in dashboard["panels"]
                if any(tr["id"] == "groupingToMatrix" for tr in p.get("transformations", []))]
    assert {m for p in matrices for t in p["targets"] for m in metric_names(t["expr"])} == {
        "ray_moe_serve_expert_tokens_total", "ray_moe_serve_expert_replicas"}
