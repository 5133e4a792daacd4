"""Run untrusted Python (a model's code and its tests) in a throwaway sandbox and report what happened.

`Sandbox(limits).run(code, stdin)` -> SandboxResult; `run_many` runs a batch on a bounded thread pool.
Linux only. Every layer below is required: `isolation_error()` checks once per process that this kernel
allows them (it runs a probe program), and `Sandbox()` refuses with one line when it does not: untrusted
code never runs unsandboxed.

Isolation of one run:
- New user, network, mount, PID, IPC and UTS namespaces. The network namespace has only a downed
  loopback, so every connect fails (127.0.0.1 included). When the caller is root it first drops to
  uid/gid 65534: a user namespace mapped onto root would ignore RLIMIT_NPROC and own root's files.
- Filesystem: everything read-only (mount_setattr, recursive), /tmp /var/tmp /run /dev/shm /home /root
  hidden under empty tmpfs (the python install is bound back in when it lives under one of them), and a
  fresh /proc showing only the sandbox's processes. The working directory (/tmp/sandbox, also HOME and
  TMPDIR) is a private size-limited tmpfs: the only writable place, gone with the run.
- The program runs under its own init (PID 1 of the PID namespace): when the program ends, init exits
  and the kernel kills every process left there, so a daemon that double-forks and calls setsid dies.
- setrlimit: CPU seconds, address space, file size, processes (counted per user namespace), open files,
  no core files; no_new_privs; a fresh environment (PATH, HOME, TMPDIR, LANG) and `python -I -S -B`.
- The parent enforces wall time and an output cap (both pipes read incrementally; the run is killed when
  a stream passes the cap, so printing 100 MB costs the parent at most the cap).

Processes: the parent starts a bootstrap (this module, `python -I -S`, in a new session) that reads the
run's spec, unshares and forks init, PID 1 of the new namespace. Init joins a session of its own (so
nothing in the sandbox can signal the bootstrap), builds the filesystem and forks the program, which
limits itself and execs python on main.py. Init reports the program's status and exits, and the kernel
kills what is left in the namespace. The bootstrap kills init when the parent closes the lifeline pipe
(wall time, output cap, parent death; init also has PDEATHSIG=SIGKILL) and exits with the program's
status.
"""

from __future__ import annotations

# Every run starts this module in a fresh interpreter (the bootstrap), so only light modules are imported
# at the top; the parent's own (subprocess, tempfile, selectors, threads) are imported where used.
import ctypes
import functools
import marshal
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

WORKDIR = "/tmp/sandbox"
HIDDEN = ("/tmp", "/var/tmp", "/run", "/dev/shm", "/home", "/root")
NOBODY = 65534
SETUP_FAILED = 125  # the bootstrap's exit status when the sandbox could not be built

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # the same on every architecture
_OPEN_TREE_CLONE, _MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0x4
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38


@dataclass(frozen=True)
class Limits:
    wall_time_s: float = 10.0
    cpu_time_s: int = 10
    memory_mb: int = 512  # address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file it may write
    disk_mb: int = 64  # size of its working directory (tmpfs)
    processes: int = 32  # processes and threads of the program at once
    open_files: int = 64
    output_bytes: int = 1 << 20  # per stream; the run is killed past it


@dataclass(frozen=True)
class SandboxResult:
    """exit_code: the program's status, negative for a signal (as subprocess), SETUP_FAILED when the
    sandbox could not be built (the reason is in stderr). killed: why it was stopped: "wall_time",
    "output_limit", "cpu_time" (RLIMIT_CPU) or the killing signal's name; None when it ended by itself.
    stdout and stderr hold at most Limits.output_bytes each (truncated: a stream was cut there)."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    killed: str | None
    duration_s: float
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None


class Sandbox:
    def __init__(self, limits: Limits | None = None, tmp_root: str | None = None) -> None:
        """tmp_root: where the per-run spec directory is made (default: the system's temporary dir)."""
        from core.errors import InputError  # not at the top: the bootstrap runs this file on the stdlib alone

        self.limits, self.tmp_root = limits or Limits(), tmp_root
        if (reason := isolation_error()) is not None:
            raise InputError(f"cannot sandbox untrusted code on this machine: {reason}")

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        return run_sandboxed(code, stdin, self.limits, self.tmp_root)

    def run_many(
        self, codes: Sequence[str], stdins: Sequence[str] | None = None, max_workers: int = 4
    ) -> list[SandboxResult]:
        """Results in the order of `codes`; at most max_workers sandboxes at once."""
        from concurrent.futures import ThreadPoolExecutor

        stdins = list(stdins) if stdins is not None else [""] * len(codes)
        if len(stdins) != len(codes):
            raise ValueError(f"{len(codes)} programs but {len(stdins)} stdins")
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            return list(pool.map(self.run, codes, stdins))


# ------------------------------------------------------------------------------------------------ parent


@functools.cache
def isolation_error() -> str | None:
    """None when this machine can build the sandbox (checked by running a probe, once); else why not."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux namespaces (this is {sys.platform})"
    probe = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.settimeout(1)\n"
        "try:\n"
        "    s.connect(('127.0.0.1', 9))\n"
        "except OSError:\n"
        "    print('isolated')\n"
    )
    try:
        result = run_sandboxed(probe, "", Limits(wall_time_s=20), None)
    except OSError as e:  # e.g. no pidfd_open (Linux < 5.3)
        return f"the probe could not run ({e})"
    if result.stdout.strip() == "isolated" and result.ok:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit status {result.exit_code}, stdout {result.stdout[:80]!r}"
    return f"the probe run failed ({detail})"


def run_sandboxed(code: str, stdin: str, limits: Limits, tmp_root: str | None) -> SandboxResult:
    """One run (see the module docstring); the spec directory in tmp_root is removed before it returns."""
    import subprocess
    import tempfile

    exe = os.path.realpath(sys.executable)
    with tempfile.TemporaryDirectory(prefix="sandbox-", dir=tmp_root) as spec_dir:
        lifeline_r, lifeline_w = os.pipe()
        spec = {
            "code": code,
            "exe": exe,
            "prefix": os.path.realpath(sys.base_prefix),
            "limits": asdict(limits),
            "lifeline": lifeline_r,
        }
        spec_path, stdin_path = os.path.join(spec_dir, "spec"), os.path.join(spec_dir, "stdin")
        with open(spec_path, "wb") as f:
            marshal.dump(spec, f)  # read by the same interpreter version
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        start = time.monotonic()
        try:
            with open(stdin_path, "rb") as stdin_file:
                proc = subprocess.Popen(
                    [exe, "-I", "-S", os.path.abspath(__file__), spec_path],
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env={"PATH": "/usr/bin:/bin"},
                    cwd=spec_dir,
                    start_new_session=True,
                    pass_fds=(lifeline_r,),
                )
        except BaseException:
            os.close(lifeline_w)
            raise
        finally:
            os.close(lifeline_r)
        pidfd = os.pidfd_open(proc.pid)  # readable once the bootstrap exits
        deadline = start + limits.wall_time_s
        try:
            out, err, killed, truncated = _collect(
                proc.stdout.fileno(), proc.stderr.fileno(), deadline, limits.output_bytes
            )
            if killed is None and not _exited(pidfd, deadline - time.monotonic()):
                killed = "wall_time"  # its output is closed but it still runs
        finally:
            os.close(lifeline_w)  # the bootstrap kills init if it still runs, which ends the namespace
            _end_group(proc.pid, pidfd)
            exit_code = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        duration = time.monotonic() - start
    if killed is None and exit_code < 0:
        killed = "cpu_time" if -exit_code == signal.SIGXCPU else signal.Signals(-exit_code).name
    return SandboxResult(
        exit_code=exit_code,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        timed_out=killed == "wall_time",
        killed=killed,
        duration_s=duration,
        truncated=truncated,
    )


def _collect(out_fd: int, err_fd: int, deadline: float, cap: int) -> tuple[bytes, bytes, str | None, bool]:
    """Both pipes until EOF, the deadline or a stream past `cap` bytes (at most cap bytes kept of each)."""
    import selectors

    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    sizes = dict.fromkeys(chunks, 0)
    killed, truncated = None, False
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and killed is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed = "wall_time"
                break
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                chunks[key.fd].append(data[: max(0, cap - sizes[key.fd])])
                sizes[key.fd] += len(data)
                if sizes[key.fd] > cap:
                    killed, truncated = "output_limit", True
    return b"".join(chunks[out_fd]), b"".join(chunks[err_fd]), killed, truncated


def _exited(pidfd: int, timeout: float) -> bool:
    poller = select.poll()  # not select.select: a trainer's fds can be past FD_SETSIZE
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def _end_group(pid: int, pidfd: int) -> None:
    """Wait for the bootstrap (it exits once the sandbox is gone), then SIGKILL its process group: a no-op
    normally, the end of a bootstrap that hangs. The exited leader is not reaped yet, so the group's id
    cannot have been reused."""
    try:
        _exited(pidfd, 10.0)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


# ------------------------------------------------------------------------------- bootstrap (child side)
# This file run as `python -I -S sandbox.py SPEC` (stdlib only), in a new session.


def bootstrap(spec_path: str) -> None:
    with open(spec_path, "rb") as f:
        spec = marshal.load(f)
    try:
        prefix_tree = _enter_namespaces(spec["prefix"])
    except OSError as e:
        _fail(f"namespaces: {e}")
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(status_r)
            _init(spec, prefix_tree, status_w)
        except BaseException as e:  # noqa: BLE001  (nothing may escape a forked child)
            _fail(f"setup: {e!r}")
    os.close(status_w)
    _supervise(pid, spec["lifeline"], status_r)


def _fail(message: str) -> None:
    os.write(2, f"sandbox: {message}\n".encode())
    os._exit(SETUP_FAILED)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(result: int, what: str) -> None:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _enter_namespaces(prefix: str) -> int | None:
    """Drop root to nobody, then new user/net/mount/pid/ipc/uts namespaces with our ids mapped to
    themselves (a non-zero uid: execve leaves it no capabilities in the namespace).

    Returns a detached copy (open_tree) of the python install when it lives under a HIDDEN directory, to
    be mounted back there: cloned while it can still be reached (root's home is closed to nobody) and
    where we may (root: before dropping; anyone else: in the new namespaces, before hiding)."""
    libc = _libc()
    hidden = any(prefix == h or prefix.startswith(h + "/") for h in HIDDEN)
    tree = None
    if os.geteuid() == 0:
        tree = _open_tree(libc, prefix) if hidden else None
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        _check(libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl")  # so /proc/self/uid_map is ours
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    _check(libc.unshare(flags), "unshare")
    for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(line)
    if hidden and tree is None:
        tree = _open_tree(libc, prefix)
    return tree


def _open_tree(libc: ctypes.CDLL, path: str) -> int:
    flags = _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC
    tree = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), flags)
    _check(tree, f"open_tree {path}")
    return tree


def _init(spec: dict, prefix_tree: int | None, status_w: int) -> None:
    """PID 1 of the new namespace (a fork of the bootstrap): build the filesystem, fork the program, wait
    for it and send its wait status up the status pipe. The program is not PID 1 itself, so signals
    (SIGXCPU, its own kill()s) act on it as usual; when init exits the kernel kills whatever is left."""
    libc = _libc()
    os.setsid()  # out of the bootstrap's group and session: kill(0, ...) cannot reach it
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")  # the bootstrap died
    _build_filesystem(libc, spec, prefix_tree, Limits(**spec["limits"]))
    pid = os.fork()
    if pid == 0:
        try:
            os.close(status_w)
            _exec_program(libc, spec)
        except BaseException as e:  # noqa: BLE001
            _fail(f"setup: {e!r}")
    _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl")  # the program may not read init's memory
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _, status = os.waitpid(pid, 0)
    os.write(status_w, status.to_bytes(4, "little"))
    os._exit(0)


def _exec_program(libc: ctypes.CDLL, spec: dict) -> None:
    limits = Limits(**spec["limits"])
    os.chdir(WORKDIR)
    mb = 1 << 20
    for name, value in (
        (resource.RLIMIT_CPU, limits.cpu_time_s),
        (resource.RLIMIT_AS, limits.memory_mb * mb),
        (resource.RLIMIT_FSIZE, limits.file_size_mb * mb),
        # Counted in this user namespace (set after unshare), where the bootstrap and init are two more.
        (resource.RLIMIT_NPROC, limits.processes + 2),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        hard = value + 1 if name == resource.RLIMIT_CPU else value  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(name, (value, hard))
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    os.closerange(3, 1 << 16)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": WORKDIR,
        "TMPDIR": WORKDIR,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    os.execve(spec["exe"], [spec["exe"], "-I", "-S", "-B", "-X", "utf8", "main.py"], env)


def _build_filesystem(libc: ctypes.CDLL, spec: dict, prefix_tree: int | None, limits: Limits) -> None:
    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

    def setattr_(path: str, flags: int, attr_set: int, attr_clr: int) -> None:
        attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)  # struct mount_attr
        args = (_AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
        _check(libc.syscall(_SYS_MOUNT_SETATTR, *args), f"mount_setattr {path}")

    mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back to the host
    for path in HIDDEN:
        if os.path.isdir(path) and not os.path.islink(path):
            mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    if prefix_tree is not None:
        os.makedirs(spec["prefix"], exist_ok=True)
        args = (prefix_tree, b"", _AT_FDCWD, spec["prefix"].encode(), _MOVE_MOUNT_F_EMPTY_PATH)
        _check(libc.syscall(_SYS_MOVE_MOUNT, *args), f"move_mount {spec['prefix']}")
        os.close(prefix_tree)
    os.mkdir(WORKDIR)
    mount("tmpfs", WORKDIR, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={limits.disk_mb}m,mode=700")
    with open(os.path.join(WORKDIR, "main.py"), "w", encoding="utf-8") as f:
        f.write(spec["code"])
    setattr_("/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0)
    setattr_(WORKDIR, 0, 0, _MOUNT_ATTR_RDONLY)
    try:
        mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:  # the kernel refuses a new proc where the host's is partly masked: hide it instead
        mount("tmpfs", "/proc", "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k")
        return
    try:  # hardening: no nested user namespaces (kernel attack surface); the locked mounts hold anyway
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    except OSError:
        pass
    setattr_("/proc", 0, _MOUNT_ATTR_RDONLY, 0)


def _supervise(init: int, lifeline: int, status_r: int) -> None:
    """The bootstrap after the fork: wait for init, or kill it when the parent closes the lifeline; then
    exit with the program's status (a signal re-raised, so the parent sees the same returncode)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the pipes reach EOF when the sandbox's last process is gone
        os.dup2(devnull, fd)
    pidfd = os.pidfd_open(init)
    ready, _, _ = select.select([pidfd, lifeline], [], [])
    if lifeline in ready:
        os.kill(init, signal.SIGKILL)  # not yet reaped: the pid is still init's
    _, status = os.waitpid(init, 0)
    reported = os.read(status_r, 4)
    if len(reported) == 4:
        status = int.from_bytes(reported, "little")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is to ignore
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    bootstrap(sys.argv[1])
