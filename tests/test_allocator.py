"""`rerankd serve` on tcmalloc where the system has it (rerankd.allocator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rerankd.allocator import (
    ALLOCATOR_ENV,
    allocator_in_use,
    find_tcmalloc,
    preload_plan,
)

LIBRARY = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def found() -> str:
    return LIBRARY


def missing() -> None:
    return None


def test_serve_preloads_tcmalloc_when_it_is_installed():
    assert preload_plan({}, found) == LIBRARY


def test_a_users_own_preloads_are_kept_after_tcmalloc():
    assert preload_plan({"LD_PRELOAD": "/opt/libiomp5.so"}, found) == f"{LIBRARY} /opt/libiomp5.so"


@pytest.mark.parametrize(
    "env",
    [
        {ALLOCATOR_ENV: "system"},
        {ALLOCATOR_ENV: " System "},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
        {"LD_PRELOAD": "/x/libtcmalloc.so.4"},
        {"RERANKD_ALLOCATOR_PRELOADED": "1"},  # the re-executed process itself
    ],
)
def test_nothing_changes_when_asked_or_already_preloaded(env):
    assert preload_plan(env, found) is None


def test_nothing_changes_without_tcmalloc_installed():
    assert preload_plan({ALLOCATOR_ENV: "auto"}, missing) is None


def test_an_unknown_allocator_setting_is_an_error():
    with pytest.raises(ValueError, match="use auto or system"):
        preload_plan({ALLOCATOR_ENV: "tcmalloc"}, found)


def test_the_library_is_found_in_the_system_directories(tmp_path):
    assert find_tcmalloc([str(tmp_path)]) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert find_tcmalloc([str(tmp_path / "missing"), str(tmp_path)]) == str(
        tmp_path / "libtcmalloc.so.4"
    )


def test_the_allocator_in_use_is_read_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator_in_use(str(maps)) == "system"
    maps.write_text(maps.read_text() + f"7f02-7f03 r-xp 0 08:01 2 {LIBRARY}\n")
    assert allocator_in_use(str(maps)) == "tcmalloc"
    assert allocator_in_use(str(tmp_path / "absent")) == "system"


def test_a_real_server_runs_on_tcmalloc_exactly_where_it_is_installed(qwen3_float32):
    """The session's shared server, started as `rerankd serve` is: it re-executed itself
    with tcmalloc preloaded where this machine has the library, and kept glibc elsewhere;
    either way it serves."""
    maps = Path(f"/proc/{qwen3_float32.pid}/maps").read_text()
    assert ("tcmalloc" in maps) == (find_tcmalloc() is not None)
    assert qwen3_float32.healthy()
