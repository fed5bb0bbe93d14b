"""Building the test suite's custom-op libraries from their C++ sources, with a cache.

ONNX Runtime's C/C++ headers do not ship with its wheel. They are taken from, in order:
`$ORT_INCLUDE_DIR`, an installed `libonnxruntime-dev` (/usr/include/onnxruntime), or that Debian
package's .deb, downloaded with apt from Debian 13 (trixie) and unpacked into the cache without
being installed (this works on Debian 12 and 13 alike).

Builds are cached under `.cache/oplibs/` by a hash of the source, the flags and the headers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OPSERVE_TEST_CACHE", ROOT / ".cache"))
SOURCES = Path(__file__).resolve().parent

_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (its sources, never a name of ours)."""
    sources = Path("/etc/apt")
    texts = [p.read_text() for p in sorted((sources / "sources.list.d").glob("*.sources"))]
    for text in texts:  # deb822: "URIs: <uri>"
        for line in text.splitlines():
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
    raise RuntimeError("no Debian archive found in /etc/apt: set ORT_INCLUDE_DIR instead")


def onnxruntime_include_dir() -> Path:
    explicit = os.environ.get("ORT_INCLUDE_DIR")
    if explicit:
        return Path(explicit)
    system = Path("/usr/include/onnxruntime")
    if (system / "onnxruntime_cxx_api.h").exists():
        return system
    unpacked = CACHE / "onnxruntime-dev" / "usr" / "include" / "onnxruntime"
    if not (unpacked / "onnxruntime_cxx_api.h").exists():
        _download_onnxruntime_dev(CACHE / "onnxruntime-dev")
    return unpacked


def _download_onnxruntime_dev(target: Path) -> None:
    """apt-get download libonnxruntime-dev from trixie into a private apt state; unpack it."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(
            f"deb [signed-by={_KEYRING}] {_debian_mirror()} trixie main\n"
        )
        options = [
            f"-o=Dir::Etc::SourceList={work / 'sources.list'}",
            "-o=Dir::Etc::SourceParts=/dev/null",
            f"-o=Dir::State::Lists={work / 'lists'}",
            f"-o=Dir::Cache={work / 'cache'}",
            "-o=APT::Sandbox::User=root",
            "-q",
        ]
        subprocess.run(["apt-get", *options, "update"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", *options, "download", "libonnxruntime-dev"],
            check=True,
            cwd=work,
            capture_output=True,
        )
        (deb,) = work.glob("libonnxruntime-dev_*.deb")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)


def build_library(
    source: Path,
    output_name: str,
    defines: dict[str, str] | None = None,
    include_dirs: list[Path] | None = None,
    extra_flags: list[str] | None = None,
    link_flags: list[str] | None = None,
    std: str = "c++17",
    cache_key: str = "",
) -> Path:
    """Compile `source` into a shared library (cached); returns its path.

    `cache_key` carries what the flags do not show, such as the framework's version.
    """
    defines = defines or {}
    include_dirs = include_dirs or []
    flags = ["-shared", "-fPIC", "-O2", f"-std={std}", *(extra_flags or [])]
    flags += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    flags += [f"-I{d}" for d in include_dirs]
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update("\0".join(flags + (link_flags or []) + [cache_key]).encode())
    for directory in include_dirs:
        for header in sorted(directory.glob("*.h")):
            digest.update(header.name.encode())
            digest.update(header.read_bytes())
    out_dir = CACHE / "oplibs" / digest.hexdigest()[:16]
    output = out_dir / output_name
    if not output.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / (output_name + ".partial")
        result = subprocess.run(
            [
                os.environ.get("CXX", "g++"),
                *flags,
                str(source),
                "-o",
                str(partial),
                *(link_flags or []),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building {source} failed:\n{result.stderr}")
        partial.rename(output)
    return output


def onnxruntime_my_ops(
    add_value: float = 1.0, name: str = "libmy_ops.so", request_api_version: int | None = None
) -> Path:
    defines = {"ADD_VALUE": f"{add_value}f"}
    if request_api_version is not None:
        defines["REQUEST_API_VERSION"] = str(request_api_version)
    return build_library(
        SOURCES / "onnxruntime" / "my_ops.cc",
        name,
        defines=defines,
        include_dirs=[onnxruntime_include_dir()],
        std="c++20",
    )


@functools.cache
def framework_build_flags(framework: str) -> dict[str, object]:
    """Ask a framework, in a child process, for its version and the flags to build against it."""
    code = {
        "pytorch": (
            "import json, torch, torch.utils.cpp_extension as c;"
            "print(json.dumps({'version': torch.__version__, 'include': c.include_paths(),"
            " 'lib': c.library_paths(), 'abi': int(torch._C._GLIBCXX_USE_CXX11_ABI)}))"
        ),
        "tensorflow": (
            "import json, tensorflow as tf;"
            "print(json.dumps({'version': tf.__version__, 'compile': tf.sysconfig.get_compile_flags(),"
            " 'link': tf.sysconfig.get_link_flags()}))"
        ),
    }[framework]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot ask {framework} for its build flags:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def pytorch_my_ops(
    add_value: float = 1.0, name: str = "libmy_torch_ops.so", needs_missing_symbol: bool = False
) -> Path:
    """my_ops::custom_modulo and my_ops::add_one for TorchScript (torch wants C++20)."""
    flags = framework_build_flags("pytorch")
    defines = {"ADD_VALUE": repr(float(add_value)), "_GLIBCXX_USE_CXX11_ABI": str(flags["abi"])}
    if needs_missing_symbol:
        defines["NEEDS_MISSING_SYMBOL"] = "1"
    return build_library(
        SOURCES / "pytorch" / "my_ops.cc",
        name,
        defines=defines,
        include_dirs=[Path(p) for p in flags["include"]],  # type: ignore[union-attr]
        link_flags=[*(f"-L{p}" for p in flags["lib"]), "-lc10", "-ltorch_cpu", "-ltorch"],  # type: ignore[union-attr]
        std="c++20",
        cache_key=f"torch {flags['version']}",
    )


def tensorflow_zero_out(name: str = "libzero_out.so", keep_last: bool = False) -> Path:
    """The classic ZeroOut op for TensorFlow, with the flags TensorFlow gives."""
    flags = framework_build_flags("tensorflow")
    compile_flags = [f for f in flags["compile"] if not f.startswith("--std")]  # type: ignore[union-attr]
    return build_library(
        SOURCES / "tensorflow" / "zero_out.cc",
        name,
        defines={"KEEP_LAST": "1"} if keep_last else None,
        extra_flags=compile_flags,
        link_flags=list(flags["link"]),  # type: ignore[arg-type]
        std="c++17",
        cache_key=f"tensorflow {flags['version']}",
    )


def copy_to(library: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(library, target)
    return target


if __name__ == "__main__":  # python tests/oplibs/build.py: build everything once
    print(onnxruntime_my_ops())
    print(pytorch_my_ops())
    print(tensorflow_zero_out())
    sys.exit(0)
