"""The allocator tuning every server and worker applies at start-up."""

from __future__ import annotations

import platform
import subprocess

import pytest

from opserve.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuning_the_allocator_starts_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child process at start-up, before the server has its signal handlers, would let a
    SIGTERM kill the server outright (find_library ran `ldconfig -p`)."""

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    assert keep_freed_memory()
