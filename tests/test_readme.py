"""The README as a newcomer follows it: the first command installs what the next ones use, the
commands shown after it work against the example repository, and every link stays inside the
repository."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT
from tests.serving import RunningServer

README = ROOT / "README.md"


def between(text: str, marker: str) -> str:
    """The text between `<!-- marker -->` and `<!-- /marker -->`."""
    return text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def first_command() -> str:
    (command,) = fenced_blocks(between(README.read_text(), "first-command"), "bash")
    return command.strip()


def after_first_command(language: str) -> list[str]:
    """The blocks the README shows between its first command and the test command."""
    text = README.read_text().split("<!-- /first-command -->", 1)[1]
    return fenced_blocks(text.split("<!-- test-command -->", 1)[0], language)


def installed_requirements(extras: set[str]) -> list[Requirement]:
    """What `pip install '.[extras]'` installs of this package's own requirements."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    pending = set(extras)
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if requirement.name == project["name"]:  # opserve[a,b] names other extras
                pending |= requirement.extras - seen
            else:
                requirements.append(requirement)
    return requirements


def test_the_first_command_installs_an_http_and_grpc_tritonclient() -> None:
    command = first_command()
    match = re.search(r"pip install -e '\.\[([a-z,]+)\]'", command)
    assert match, command
    extras = set(match.group(1).split(","))
    clients = [r for r in installed_requirements(extras) if r.name == "tritonclient"]
    installed = set().union(*(r.extras for r in clients))
    assert {"http", "grpc"} <= installed or "all" in installed, clients
    # and it prepares and serves the example repository the next commands query
    assert "python examples/prepare.py" in command
    assert command.endswith("opserve serve --model-repository examples/model_repository")


def test_the_curl_commands_work(example_server: RunningServer) -> None:
    (block,) = after_first_command("bash")
    commands = re.split(r"\n(?=curl )", block.strip())
    assert len(commands) == 3
    for command in commands:
        command = command.replace("localhost:8000", example_server.url)
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True
        )
        answer = json.loads(result.stdout)
        assert "error" not in answer, (command, answer)
        assert answer["model_name"] in command


def test_the_tritonclient_example_works_over_http_and_grpc(example_server: RunningServer) -> None:
    (code,) = after_first_command("python")
    code = code.replace("localhost:8000", example_server.url)
    code = code.replace("localhost:8001", example_server.grpc_url)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2  # one answer over HTTP, one over gRPC
    for line in lines:  # a + b, then a - b, for a = 1..16 and b = 1
        assert [int(v) for v in re.findall(r"-?\d+", line)] == [*range(2, 18), *range(0, 16)]


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", markdown_files(), ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(document: Path) -> None:
    text = document.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same file
        path = (document.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{document.name}: {target} leaves the repository"
        assert path.exists(), f"{document.name}: {target} does not exist"
    # paths written as code must not point outside the repository either
    outside = re.findall(r"`(\.\./[^`]*)`", text)
    assert not outside, f"{document.name} names paths outside the repository: {outside}"
