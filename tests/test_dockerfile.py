"""The Dockerfile's promises, read from the file (no docker here: the image was never built by
these tests): a non-root final stage whose entrypoint is `opserve serve`, a health check on the
V2 liveness endpoint, build arguments for the framework extra and CPU or CUDA, sources that
exist, and no registry host names."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

from opserve.cli import build_parser
from tests.dockerfile import DOCKERFILE, Dockerfile, arg_defaults, env_values, parse, read

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return read()


def test_the_parser_reads_stages_arguments_and_continued_lines() -> None:
    parsed = parse(
        "ARG A=1\nFROM x AS one\n# note\nRUN a \\\n  # inside\n  b\nFROM --platform=p one\n"
        'USER 7\nENTRYPOINT ["p", "q"]\n'
    )
    assert arg_defaults(parsed.global_args) == {"A": "1"}
    assert [(s.image, s.name) for s in parsed.stages] == [("x", "one"), ("one", None)]
    assert parsed.stage("one").last("RUN").arguments == "a b"
    assert parsed.final.last("ENTRYPOINT").exec_form() == ["p", "q"]


def test_the_final_stage_runs_opserve_serve_as_a_numeric_non_root_user(
    dockerfile: Dockerfile,
) -> None:
    final = dockerfile.final
    assert final.last("ENTRYPOINT").exec_form() == ["opserve", "serve"]  # exec form: PID 1
    user = final.last("USER").arguments.split(":")
    # numeric, so that a pod's runAsNonRoot can be checked by the kubelet
    assert user[0].isdigit() and int(user[0]) != 0
    assert all(part.isdigit() and int(part) != 0 for part in user)
    # the default arguments are flags opserve's own parser accepts
    defaults = build_parser().parse_args(["serve", *final.last("CMD").exec_form()])
    assert defaults.model_repository == [Path("/models")]
    # a multi-stage build: the final stage takes the environment from the build stage
    copies = [c.arguments for c in final.all("COPY")]
    assert any(c.startswith("--from=build ") for c in copies)
    assert len(dockerfile.stages) >= 3


def test_the_user_matches_the_kubernetes_manifests(dockerfile: Dockerfile) -> None:
    """The uid the Dockerfile sets is the one deploy/ runs as (KServe's runAsUser, the
    Deployment's securityContext)."""
    uid = int(dockerfile.final.last("USER").arguments.split(":")[0])
    for manifest in ("kserve/servingruntime.yaml", "kubernetes/deployment.yaml"):
        assert f"runAsUser: {uid}\n" in (ROOT / "deploy" / manifest).read_text()


def test_the_health_check_asks_the_liveness_endpoint_on_the_http_port(
    dockerfile: Dockerfile,
) -> None:
    final = dockerfile.final
    check = final.last("HEALTHCHECK").arguments
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"] and "OPSERVE_HEALTH_URL" in command[2]
    url = env_values(final)["OPSERVE_HEALTH_URL"]
    default_port = build_parser().parse_args(["serve"]).http_port
    assert url == f"http://127.0.0.1:{default_port}/v2/health/live"
    exposed = {int(port) for port in final.last("EXPOSE").arguments.split()}
    assert default_port in exposed and exposed == {8000, 8001, 8002}
    # the health check runs with the interpreter of the final stage's environment
    assert env_values(final)["PATH"].startswith("/opt/opserve/bin:")


def test_build_arguments_choose_the_extra_and_cpu_or_cuda(dockerfile: Dockerfile) -> None:
    global_args = arg_defaults(dockerfile.global_args)
    assert global_args["VARIANT"] == "cpu"
    cuda_image = global_args["CUDA_IMAGE"]
    assert cuda_image is not None and re.fullmatch(r"nvidia/cuda:[\w.]+-runtime-[\w.]+", cuda_image)
    # each variant has its base stage, and the build and runtime stages start from it
    assert {s.name for s in dockerfile.stages} >= {"base-cpu", "base-cuda", "build"}
    assert dockerfile.stage("base-cuda").image == "${CUDA_IMAGE}"
    assert dockerfile.stage("build").image == "base-${VARIANT}"
    assert dockerfile.final.image == "base-${VARIANT}"
    build = dockerfile.stage("build")
    build_args = arg_defaults(build.all("ARG"))
    assert build_args["EXTRA"] == "onnxruntime"
    assert build_args["TORCH_INDEX_URL"] == ""  # no index named here: the builder names one
    # the extras the build accepts are exactly opserve's framework extras
    check = next(r.arguments for r in build.all("RUN") if "EXTRA must be" in r.arguments)
    accepted = set(re.search(r"case \"\$\{EXTRA\}\" in ([\w|]+)\)", check).group(1).split("|"))
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert accepted == {"onnxruntime", "pytorch", "tensorflow", "all"} and accepted <= set(extras)
    install = [r.arguments for r in build.all("RUN") if "pip install" in r.arguments]
    assert any('"/src[${EXTRA},remote]"' in r for r in install)  # object storage in every image
    assert any('--index-url "${TORCH_INDEX_URL}" torch' in r for r in install)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (last match wins)."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_every_copied_source_exists_and_reaches_the_build_context(
    dockerfile: Dockerfile,
) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            words = copy.arguments.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources += [w for w in words[:-1] if not w.startswith("--")]
    assert {"pyproject.toml", "README.md", "opserve"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), source
    assert dockerignored("tests/test_dockerfile.py", patterns)
    assert dockerignored(".venv", patterns) and dockerignored(".git", patterns)


def test_no_registry_host_is_named(dockerfile: Dockerfile) -> None:
    """Images by name only (whatever registry the builder is configured for), no index URL."""
    text = DOCKERFILE.read_text()
    global_args = arg_defaults(dockerfile.global_args)
    for image in (global_args["PYTHON_IMAGE"], global_args["CUDA_IMAGE"]):
        assert image is not None
        first = image.split("/")[0]
        assert "/" not in image or ("." not in first and ":" not in first), image
    urls = re.findall(r"https?://[^\s\"']+", text)
    assert urls and all(u.startswith("http://127.0.0.1:") for u in urls), urls
