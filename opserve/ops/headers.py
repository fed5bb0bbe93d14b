"""ONNX Runtime's C/C++ headers, which its Python wheel does not ship.

Looked for, in order: `$ORT_INCLUDE_DIR`, an installed `libonnxruntime-dev`
(`/usr/include/onnxruntime`), and a copy unpacked into the cache by `fetch_onnxruntime_headers`
(Debian's `libonnxruntime-dev` package, downloaded with apt into a private apt state and unpacked
without being installed; this works on Debian 12 and 13 alike). A library built with headers of
API version N asks the runtime for API N, so the headers must not be newer than the runtime
that will load the library (`api_problem`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from opserve.errors import BuildError

SYSTEM_HEADERS = Path("/usr/include/onnxruntime")
_MAIN_HEADER = "onnxruntime_cxx_api.h"
_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_DEBIAN_SUITE = "trixie"  # the first Debian release with libonnxruntime-dev


def how_to_get_headers(cache: Path) -> str:
    return (
        "get them with one of: `opserve ops build --fetch-headers ...` (downloads Debian's "
        f"libonnxruntime-dev into {cache / 'onnxruntime-dev'} without installing it); "
        "`apt-get install libonnxruntime-dev` (Debian 13 or newer); or the include/ folder of "
        "ONNX Runtime's release archive onnxruntime-linux-x64-<version>.tgz, named by "
        "ORT_INCLUDE_DIR=<folder>"
    )


def find_onnxruntime_headers(cache: Path, explicit: str | None) -> Path:
    """The folder holding `onnxruntime_cxx_api.h`; a BuildError saying how to get one."""
    if explicit:
        if not (Path(explicit) / _MAIN_HEADER).is_file():
            raise BuildError(
                f"ORT_INCLUDE_DIR={explicit} holds no {_MAIN_HEADER}: " + how_to_get_headers(cache)
            )
        return Path(explicit)
    for candidate in (SYSTEM_HEADERS, _unpacked(cache)):
        if (candidate / _MAIN_HEADER).is_file():
            return candidate
    raise BuildError(
        "ONNX Runtime's C/C++ headers were not found (its Python wheel does not ship them; "
        f"looked at $ORT_INCLUDE_DIR, {SYSTEM_HEADERS} and {_unpacked(cache)}): "
        + how_to_get_headers(cache)
    )


def onnxruntime_headers(cache: Path, fetch: bool = False) -> Path:
    """The headers to build with: `$ORT_INCLUDE_DIR`, an installed or cached copy, or (with
    `fetch`, when there is none) Debian's package fetched into the cache."""
    explicit = os.environ.get("ORT_INCLUDE_DIR")
    try:
        return find_onnxruntime_headers(cache, explicit)
    except BuildError:
        if not fetch or explicit:
            raise
    return fetch_onnxruntime_headers(cache)


def _unpacked(cache: Path) -> Path:
    return cache / "onnxruntime-dev" / "usr" / "include" / "onnxruntime"


def headers_api_version(include_dir: Path) -> int | None:
    """`ORT_API_VERSION` as the headers define it."""
    header = include_dir / "onnxruntime_c_api.h"
    if not header.is_file():
        return None
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", header.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def api_problem(headers_api: int | None, runtime_version: str, include_dir: Path) -> str | None:
    """Headers newer than the runtime would build a library the runtime refuses (API N is
    onnxruntime 1.N, and a runtime serves its own API version and every older one)."""
    try:
        runtime_api = int(runtime_version.split(".")[1])
    except (IndexError, ValueError):
        return None
    if headers_api is None or headers_api <= runtime_api:
        return None
    return (
        f"the ONNX Runtime headers in {include_dir} are for API version {headers_api} "
        f"(onnxruntime 1.{headers_api}), newer than the environment's onnxruntime "
        f"{runtime_version} (API {runtime_api}): a library built with them would not load; "
        f"use headers of onnxruntime 1.{runtime_api} or older (ORT_INCLUDE_DIR=<folder>)"
    )


def fetch_onnxruntime_headers(cache: Path) -> Path:
    """Debian's libonnxruntime-dev, downloaded with apt from the machine's own Debian archive
    and unpacked into the cache (not installed); returns the include folder."""
    target = cache / "onnxruntime-dev"
    if (_unpacked(cache) / _MAIN_HEADER).is_file():
        return _unpacked(cache)
    try:
        mirror = _debian_mirror()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "lists" / "partial").mkdir(parents=True)
            (work / "cache" / "archives" / "partial").mkdir(parents=True)
            (work / "sources.list").write_text(
                f"deb [signed-by={_KEYRING}] {mirror} {_DEBIAN_SUITE} main\n"
            )
            options = [
                f"-o=Dir::Etc::SourceList={work / 'sources.list'}",
                "-o=Dir::Etc::SourceParts=/dev/null",
                f"-o=Dir::State::Lists={work / 'lists'}",
                f"-o=Dir::Cache={work / 'cache'}",
                "-o=APT::Sandbox::User=root",
                "-q",
            ]
            for step in (["update"], ["download", "libonnxruntime-dev"]):
                subprocess.run(
                    ["apt-get", *options, *step], check=True, cwd=work, capture_output=True
                )
            (deb,) = work.glob("libonnxruntime-dev_*.deb")
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        lines = detail.decode(errors="replace").strip().splitlines()
        raise BuildError(
            f"fetching Debian's libonnxruntime-dev failed ({lines[-1] if lines else exc}); "
            + how_to_get_headers(cache)
        ) from None
    return _unpacked(cache)


def _debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (its sources, never a name of ours)."""
    sources = Path("/etc/apt")
    for path in sorted((sources / "sources.list.d").glob("*.sources")):  # deb822: "URIs: <uri>"
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]
    for path in legacy:  # one-line style: "deb [options] <uri> <suite> ..."
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[") and not w.endswith("]")]
            if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
                return words[1]
    raise OSError("no Debian archive found in /etc/apt")
