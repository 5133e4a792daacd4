"""The sandbox contains hostile programs: each attack below runs for real, the call returns a result, and
this test process (and the host) is unaffected. Where the kernel cannot build the sandbox, Sandbox()
must refuse instead (test_refuses_or_isolates)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from core.errors import InputError
from rollout.sandbox import Limits, Sandbox, SandboxResult, isolation_error

LIMITS = Limits(wall_time_s=4, cpu_time_s=2, memory_mb=256, file_size_mb=8, processes=16)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if isolation_error() is not None:
        pytest.skip(f"no sandbox on this machine: {isolation_error()}")
    return Sandbox(LIMITS)


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that this process can reach: the sandbox must not."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def alive_in_pid_namespace(ns: str) -> list[int]:
    """Host pids of the processes in the PID namespace `ns` (as /proc/self/ns/pid names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == ns:
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
    return pids


def first_line(result: SandboxResult) -> str:
    return result.stdout.split("\n", 1)[0]


def test_refuses_or_isolates():
    reason = isolation_error()
    if reason is None:
        assert Sandbox(LIMITS).run("print('ok')").stdout == "ok\n"
    else:
        with pytest.raises(InputError, match="cannot sandbox untrusted code"):
            Sandbox(LIMITS)


def test_correct_program_passes(sandbox):
    result = sandbox.run("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="2 3 4\n")
    assert result.ok and result.stdout == "9\n" and result.stderr == ""
    assert result.killed is None and not result.timed_out and result.duration_s < LIMITS.wall_time_s


def test_pool_runs_many_in_order(sandbox):
    results = sandbox.run_many([f"print({i} * {i})" for i in range(6)], max_workers=3)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]


def test_no_network(sandbox, listener):
    port = listener.getsockname()[1]
    socket.create_connection(("127.0.0.1", port), timeout=1).close()  # reachable from here
    listener.accept()[0].close()
    code = f"""
import socket
for address in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
    try:
        socket.create_connection(address, timeout=1)
        print("connected", address)
    except OSError as e:
        print("blocked", address, e.errno)
try:
    socket.getaddrinfo("example.com", 80)
    print("resolved")
except OSError:
    print("no dns")
print([name for _, name in socket.if_nameindex()])
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert "connected" not in result.stdout and result.stdout.count("blocked") == 3
    assert "no dns" in result.stdout and "['lo']" in result.stdout
    with pytest.raises(TimeoutError):
        listener.accept()


def test_cannot_write_outside_its_directory(sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    host_tmp = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"
    this_file = Path(__file__).read_text()
    code = f"""
for path in [{str(victim)!r}, {str(host_tmp)!r}, {__file__!r}, "/etc/sandbox-escape", "/escape"]:
    try:
        with open(path, "a") as f:
            f.write("pwned")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
open("inside.txt", "w").write("fine")  # its own directory is writable
print(open("inside.txt").read())
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert "wrote" not in result.stdout and result.stdout.count("refused") == 5
    assert result.stdout.rstrip().endswith("fine")
    assert victim.read_text() == "keep" and not host_tmp.exists() and Path(__file__).read_text() == this_file
    assert not Path("/etc/sandbox-escape").exists() and not Path("/escape").exists()


def test_cannot_read_the_parents_environment(sandbox, monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TANDEM_TEST_SECRET", secret)
    code = f"""
import os
print(dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            print(open(f"/proc/{{pid}}/environ").read())
        except OSError:
            pass
for path in ["/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ"]:
    try:
        print(open(path).read())
    except OSError as e:
        print("no", path, type(e).__name__)
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "TANDEM_TEST_SECRET" not in result.stdout
    assert sorted(eval(first_line(result))) == ["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "TMPDIR"]


def test_fork_bomb_is_capped_and_nothing_survives(sandbox):
    code = """
import os, time
print(os.readlink("/proc/self/ns/pid"), flush=True)
for _ in range(10000):
    try:
        os.fork()
    except OSError as e:
        print("capped", e.errno, flush=True)
        break
time.sleep(60)
"""
    start = time.monotonic()
    result = sandbox.run(code)
    assert time.monotonic() - start < LIMITS.wall_time_s + 3
    assert result.timed_out and result.killed == "wall_time"
    assert "capped 11" in result.stdout  # EAGAIN from RLIMIT_NPROC
    assert alive_in_pid_namespace(first_line(result)) == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_memory_bomb_is_stopped(sandbox):
    result = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))")
    assert not result.ok and "MemoryError" in result.stderr and not result.timed_out
    big = sandbox.run("x = bytearray(8 << 30)")
    assert not big.ok and "MemoryError" in big.stderr


def test_infinite_loop_is_stopped_by_the_cpu_limit(sandbox):
    # A generous wall limit: on a loaded machine one CPU second can take several wall seconds.
    result = Sandbox(Limits(wall_time_s=60, cpu_time_s=1)).run("while True:\n    pass")
    assert result.killed == "cpu_time" and not result.timed_out and result.duration_s > 0.9


def test_sleeping_past_the_wall_limit_is_killed_in_time(sandbox):
    # It also closes its output, so the parent cannot wait for EOF alone.
    result = sandbox.run(
        "import os, time\nprint('start', flush=True)\nos.close(1)\nos.close(2)\ntime.sleep(60)"
    )
    assert result.timed_out and result.killed == "wall_time" and result.stdout == "start\n"
    assert LIMITS.wall_time_s <= result.duration_s < LIMITS.wall_time_s + 3


def test_a_1gb_file_is_stopped_by_the_file_size_limit(sandbox):
    code = """
chunk = b"x" * (1 << 20)
with open("big.bin", "wb") as f:
    for _ in range(1024):
        f.write(chunk)
"""
    result = sandbox.run(code)
    assert not result.ok and "File too large" in result.stderr and not result.timed_out


def test_killing_its_parent_does_not_reach_us(sandbox):
    me = os.getpid()
    code = f"""
import ctypes, os, signal
for pid in [os.getppid(), {me}]:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        print("kill", pid, type(e).__name__)
for group in [os.getpgid(0), {os.getpgid(0)}]:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError as e:
        print("killpg", group, type(e).__name__)
libc = ctypes.CDLL(None)
libc.prctl(1, 0, 0, 0, 0)  # clear its parent-death signal
print("libc.kill", libc.kill({me}, 9), libc.kill(-1, 9))
print("survived", flush=True)
"""
    result = sandbox.run(code)
    assert "survived" in result.stdout  # it is its namespace's init: its own signals do not kill it
    assert os.getpid() == me and sandbox.run("print(1)").stdout == "1\n"  # we, and the machinery, are fine


def test_os_system_and_subprocess_are_contained(sandbox, listener):
    port = listener.getsockname()[1]
    host_file = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"
    code = f"""
import os, subprocess, sys
print("system", os.system("touch {host_file}"))
connect = "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
print("child python", subprocess.run([sys.executable, "-c", connect], capture_output=True).returncode)
print("sh", subprocess.run(["sh", "-c", "echo hi > /escape-{host_file.name}"]).returncode)
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    lines = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert lines["system"] != "0" and lines["child python"] == "1" and lines["sh"] != "0"
    assert not host_file.exists() and not Path(f"/escape-{host_file.name}").exists()
    with pytest.raises(TimeoutError):
        listener.accept()


def test_ctypes_libc_is_contained(sandbox):
    host_file = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"
    code = f"""
import ctypes
libc = ctypes.CDLL(None)
print(libc.kill({os.getpid()}, 9), libc.system(b"touch {host_file}"), libc.unshare(0x40000000))
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert result.stdout.split()[0] == "-1" and not host_file.exists()


def test_relative_paths_do_not_delete_the_hosts_files(tmp_path):
    if isolation_error() is not None:
        pytest.skip(isolation_error())
    victim = tmp_path / "victim.txt"  # next to the run's own directory, made under tmp_path
    victim.write_text("keep")
    code = f"""
import os, shutil
for path in ["../victim.txt", "../../victim.txt", {str(victim)!r}]:
    try:
        os.remove(path)
    except OSError as e:
        print("kept", path, type(e).__name__)
shutil.rmtree("..", ignore_errors=True)
shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)
"""
    result = Sandbox(LIMITS, tmp_root=str(tmp_path)).run(code)
    assert result.ok and result.stdout.count("kept") == 3
    assert victim.read_text() == "keep" and list(tmp_path.iterdir()) == [victim]  # its spec dir is gone


def test_printing_100mb_is_cut_off_and_our_memory_stays_bounded():
    if isolation_error() is not None:
        pytest.skip(isolation_error())
    cap = 64 << 10
    sandbox = Sandbox(Limits(wall_time_s=20, output_bytes=cap))
    tracemalloc.start()
    try:
        result = sandbox.run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.killed == "output_limit" and result.truncated and len(result.stdout) == cap
    assert peak < 4 * cap + (1 << 20)  # the kept bytes and one read's chunk, not 100 MB


def test_chdir_to_root_does_not_escape(sandbox):
    name = f"sandbox-escape-{uuid.uuid4().hex}"
    code = f"""
import os
for directory in ["/", "/tmp", "..", os.path.expanduser("~")]:
    os.chdir(directory)
    try:
        open("{name}", "w").write("x")
        print("wrote in", os.getcwd())
    except OSError as e:
        print("refused", os.getcwd(), type(e).__name__)
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert result.stdout.count("refused") == 3 and "wrote in /tmp/sandbox" in result.stdout  # ~ is its dir
    assert not Path("/", name).exists() and not Path("/tmp", name).exists()


def test_a_daemon_does_not_outlive_the_call(sandbox):
    code = """
import os, sys, time
print(os.readlink("/proc/self/ns/pid"), flush=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in range(3):
            os.close(fd)
        time.sleep(60)
    os._exit(0)
time.sleep(0.2)  # the daemon is running
"""
    result = sandbox.run(code)
    assert result.ok and result.duration_s < LIMITS.wall_time_s  # returned without waiting for it
    assert alive_in_pid_namespace(first_line(result)) == []


def test_a_nested_namespace_cannot_undo_the_read_only_mounts(sandbox):
    host_file = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"
    code = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
    print("no nested namespace", os.strerror(ctypes.get_errno()))
else:
    for name, line in [("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"), ("gid_map", f"0 {{gid}} 1")]:
        open(f"/proc/self/{{name}}", "w").write(line)
    print("umount /tmp", libc.umount2(b"/tmp", 2))  # MNT_DETACH: uncover the host's /tmp?
    print("remount rw", libc.mount(None, b"/", None, 32 | 4096, None))  # MS_REMOUNT | MS_BIND
try:
    open({str(host_file)!r}, "w").write("x")
    print("wrote")
except OSError as e:
    print("refused", type(e).__name__)
"""
    result = sandbox.run(code)
    assert result.ok, result.stderr
    assert "refused" in result.stdout and not host_file.exists()
