"""Run model-written Python (HumanEval completions, tool calls) in a sandbox.

    result = execute_code("print(1 + 1)", timeout=5.0, maximum_memory_bytes=256 * 2**20)
    result.success, result.stdout          # True, "2\\n"

`ExecutionResult` keeps upstream nanochat's fields (success, stdout, stderr, error, timeout, memory_exceeded) and
adds `sandbox`: which protections were in force for that run (see below), so callers and tests can check them.

How it runs. The caller never forks itself (it may be a multi-threaded trainer holding CUDA): it starts a fresh
interpreter (`python -I -S`, no site-packages, no PYTHON* variables) with subprocess in a new session, with an
environment built from scratch (PATH, LANG, HOME and TMPDIR = the run's folder, OMP_NUM_THREADS=1; nothing of
the caller's, so WANDB_API_KEY, HF_TOKEN, ... never reach it), the code on stdin (an unlinked temporary file),
and its stdout/stderr on pipes that the caller reads with a size cap. That interpreter ("setup") builds the
isolation and then execs a second fresh interpreter ("run") that applies the in-process limits and runs the code;
its exit status is the verdict (see "The verdict" below).
Only the standard library is importable. A root caller's interpreter must be runnable by `nobody`; when it is
not (e.g. a pyenv under /root), the first system python3 >= 3.8 that is gets used (`python_for_uid`).

Layers, outermost first ("holds" = checked by tests/test_execution.py on Linux x86_64):

1. Namespaces (when `use_namespaces`, the default). As root: unshare(NEWNS|NEWNET|NEWPID|NEWIPC|NEWUTS)
   directly. As non-root: the same plus NEWUSER (an unprivileged user namespace mapping only the caller's own
   uid/gid), where the kernel allows it. Then:
   - network: a new network namespace has only a loopback device, left down; nothing on the host (not even
     127.0.0.1) is reachable, and abstract unix sockets are per-namespace too;
   - pid: the code runs as PID 1 of a new pid namespace with a fresh /proc: it sees no other process (no
     /proc/<pid>/environ of the caller), and when it exits or is killed every process it made dies with it;
   - mounts: "/" is made private first (nothing propagates to the host), the run's folder gets a fresh tmpfs
     (64 MiB, 4096 inodes, noexec), and every other mount is remounted read-only in the namespace: writes
     anywhere but the run's folder fail with EROFS, even to world-writable places like /tmp and /dev/shm.
   Without namespaces (disabled, or refused by the kernel / a container's seccomp profile) these fall back to
   layers 3-5.
2. Privileges. As root the code runs as `nobody` (65534:65534, no supplementary groups): root's files,
   /proc/<pid>/environ of root processes and RLIMIT_NPROC (which does not bind root) all need this. In the user
   namespace case all capabilities are dropped by the exec into the second interpreter (its uid is not 0 there).
   A non-root caller's code runs as the caller's uid: its own files are protected only by layers 1 and 4.
3. Resource limits (setrlimit, soft = hard, so the code cannot raise them): RLIMIT_AS and RLIMIT_DATA =
   maximum_memory_bytes (MemoryError -> memory_exceeded), RLIMIT_NPROC = max_processes (threads count too; it
   counts all processes of that uid in that user namespace: with the root -> nobody drop that is every `nobody`
   process on the host, including parallel runs; for a non-root caller without user namespaces, all of the
   caller's own processes and threads), RLIMIT_FSIZE = max_file_bytes (SIGXFSZ ignored: an over-long write
   raises OSError), RLIMIT_NOFILE = 64, RLIMIT_CORE = 0, RLIMIT_CPU = timeout + 2 s (a backstop). Wall clock:
   an interval timer raises a timeout inside the code after `timeout` seconds; the caller kills the whole
   process group with SIGKILL at timeout + 1 s regardless (code that blocks SIGALRM or spins in C cannot
   outlive that).
4. Landlock (Linux >= 5.13, any uid, needs no privilege): reads limited to the system and interpreter folders
   (/usr, /lib*, /bin, /sbin, /etc, /dev, /proc, /sys, the interpreter's prefixes and sys.path) and writes to
   the run's folder (plus /dev/null). So without namespaces a non-root caller's home, repo and /tmp are neither
   readable nor writable, and Landlock also forbids ptrace-style access (/proc/<pid>/environ, /proc/<pid>/mem)
   to any process outside the sandbox, whatever its uid.
5. seccomp-bpf (any uid; no_new_privs): socket() (every family; socketpair() stays, for asyncio), process
   creation (fork, vfork, clone without CLONE_THREAD; clone3 answers ENOSYS so threads fall back to clone),
   execve/execveat, every signal-sending call (kill, tkill, tgkill, sigqueue, pidfd_send_signal), ptrace,
   process_vm_readv/writev, setsid/setpgid (no leaving the process group that gets killed), unshare/setns,
   mount family, chroot, io_uring, bpf, perf_event_open, userfaultfd and the keyring fail with EPERM; so do
   x32 syscalls, and another architecture's syscalls (i386 via int 0x80) kill the process. Tables for
   x86_64 and aarch64; elsewhere this layer is skipped (and reported so).
6. A Python-level guard like upstream's "reliability guard": os.kill/system/fork/exec*/spawn*/putenv/set*id,
   subprocess.Popen & co., socket.socket, exit/quit/help disabled; os.remove/unlink/rmdir/rename/replace/
   chmod/chown/truncate/link/symlink and shutil.rmtree/move/chown allowed only inside the run's folder. This is
   for clear error messages: Python code can bypass it (ctypes, `posix`, `_socket`), layers 1-5 are the barrier.

What holds where (tested here: Debian 12, kernel 6.18, root and `nobody`):
- root (default): all of 1-6.
- non-root with unprivileged user namespaces: all of 1 and 3-6; the code keeps the caller's uid.
- non-root without user namespaces: 3-6. No network (seccomp), no writes or reads outside the allowed folders
  and no access to other processes (Landlock), no new processes or signals (seccomp). Without Landlock (old
  kernels) the caller's files and /proc/<caller>/environ would be open to the code's uid.
- any uid, no ctypes in the interpreter: only 2, 3 and 6.

The verdict. The code runs in the process that reports on it, so it can write whatever that process can write
(os.write on any descriptor, rebinding anything in its interpreter): nothing it can reach may carry the verdict.
The "run" interpreter reports the layers on the status pipe before the code starts and then closes it (the setup
process outside the pid namespace closes its copy; the caller keeps the first record of each kind, should a weak
configuration let the code reopen the pipe through /proc). The verdict is the run process's exit status, which
the caller gets from the kernel (waitpid), plus its own kill at the deadline: `_EXIT_CODES` says how the code
ended ("ok": it ran to its end), any other status or a signal is a failure. A failure's text comes on a "detail"
pipe, read only when the status says the run failed (the code can write there too, but only to reword its own
failure). So code that fails (raises, runs out of time or memory, is killed, exits early with any other status)
is never reported as passing, whatever it writes, prints or rebinds (`sys.modules["__main__"]`, os, signal,
traceback, sys.stdout: what the child calls after the code is bound before it runs). What no sandbox can tell
apart is code that itself ends its process as a finished run does (`posix._exit(100)` from the code, a thread, a
handler or a method of its own objects): that is the code choosing its own outcome, like catching its own failing assert or returning an
object equal to everything, and a grader must not count on it being unable to. SystemExit (sys.exit) and
os._exit(0) count as failures, as upstream: otherwise `sys.exit(0)` before the asserts would pass any test.

Not covered: CPU/memory bandwidth and kernel bugs.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

NOBODY = (65534, 65534)  # uid, gid the code runs as when the caller is root
_GRACE_S = 1.0  # the caller's hard kill comes this long after `timeout`
_TMPFS_BYTES = 64 * 2**20
_TMPFS_INODES = 4096
_MAX_OPEN_FILES = 64
# How the sandboxed process ends says how the code ended (see "The verdict" in the module docstring). Below 128,
# so that none reads as a signal; 0 and 1 are left to the interpreter's own exits.
_EXIT_CODES = {"ok": 100, "error": 101, "timeout": 102, "memory": 103}
_DETAIL_BYTES = 4096  # the error text kept from the detail pipe


@dataclass
class ExecutionResult:
    """Result of executing Python code in the sandbox (upstream's fields, plus `sandbox`: the layers in force)."""

    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False
    sandbox: dict = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self):
        parts = [f"ExecutionResult(success={self.success}"]
        if self.timeout:
            parts.append(", timeout=True")
        if self.memory_exceeded:
            parts.append(", memory_exceeded=True")
        if self.error:
            parts.append(f", error={self.error!r}")
        if self.stdout:
            parts.append(f", stdout={self.stdout!r}")
        if self.stderr:
            parts.append(f", stderr={self.stderr!r}")
        return "".join(parts) + ")"


@functools.lru_cache(maxsize=1)
def _child_program() -> str:
    """The `-c` program of the sandboxed interpreters: nanochat/sandbox_child.py's text (never imported), which
    carries itself along as _C_SRC to re-exec the second interpreter (sandbox_child._c_program, same format)."""
    src = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")
    return "_C_SRC = %r\nexec(compile(_C_SRC, '<nanochat-sandbox>', 'exec'))\n_c_main(_C_SRC)\n" % src


@functools.lru_cache(maxsize=8)
def python_for_uid(uid: Optional[int], gid: Optional[int] = None) -> Optional[str]:
    """An interpreter that `uid` can run (None: the caller's own, sys.executable).

    A root caller's interpreter may live where `nobody` cannot reach it (a pyenv under /root); then the first
    system python3 (>= 3.8) that `nobody` can start is used. The code needs only the standard library."""
    if uid is None:
        return sys.executable
    import shutil
    import subprocess
    candidates = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", None)]
    candidates += [shutil.which("python3", path=p) for p in ("/usr/local/bin", "/usr/bin", "/bin")]
    seen = []
    for exe in candidates:
        if not exe or exe in seen or not os.path.isfile(exe):
            continue
        seen.append(exe)
        try:
            probe = subprocess.run([exe, "-I", "-S", "-c", "import sys; sys.exit(sys.version_info < (3, 8))"],
                                   user=uid, group=gid if gid is not None else uid, extra_groups=[], cwd="/",
                                   env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return exe
    return None


class _Capped:
    """Keeps the first `limit` bytes of a stream, counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.data, self.dropped = limit, bytearray(), 0

    def add(self, chunk: bytes):
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            out += f"\n[output truncated: {self.dropped} more bytes]"
        return out


def _exited(pid: int) -> bool:
    """Has `pid` exited? Without reaping it, so its process group id cannot be reused before we kill the group."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str):
    import shutil

    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def execute_code(
    code: str,
    timeout: float = 5.0,
    maximum_memory_bytes: Optional[int] = 256 * 2**20,
    max_processes: int = 32,
    max_output_bytes: int = 2**20,
    *,
    max_file_bytes: int = 16 * 2**20,
    use_namespaces: bool = True,
    _disable: tuple = (),
) -> ExecutionResult:
    """Run `code` (Python source) in the sandbox described in this module's docstring.

    timeout: wall-clock seconds for the code (the process is killed at timeout + 1 s whatever it does).
    maximum_memory_bytes: RLIMIT_AS/RLIMIT_DATA (None: no memory limit). max_processes: RLIMIT_NPROC (threads
    count). max_output_bytes: kept of stdout and of stderr each (the rest is dropped, and the text says so).
    max_file_bytes: RLIMIT_FSIZE. use_namespaces=False skips layer 1 (to test the fallbacks). `_disable`
    (tests only) turns off in-process layers by name: "landlock", "seccomp", "guard".
    """
    import subprocess
    import tempfile

    drop = NOBODY if os.geteuid() == 0 else None
    exe = python_for_uid(*drop) if drop else sys.executable
    if exe is None:
        return ExecutionResult(False, "", "", error="Sandbox failed: no Python interpreter that uid "
                               f"{drop[0]} can run (make one readable and executable by it)")
    work = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-exec-"))
    out_r = out_w = err_r = err_w = st_r = st_w = dt_r = dt_w = None
    proc = None
    try:
        if drop:
            os.chown(work, *drop)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        dt_r, dt_w = os.pipe()
        cfg = {"work": work, "timeout": max(float(timeout), 1e-3), "memory": int(maximum_memory_bytes or 0),
               "max_processes": int(max_processes), "max_file_bytes": int(max_file_bytes),
               "max_open_files": _MAX_OPEN_FILES, "drop": list(drop) if drop else None,
               "namespaces": bool(use_namespaces), "status_fd": st_w, "detail_fd": dt_w,
               "exit_codes": _EXIT_CODES, "tmpfs_bytes": _TMPFS_BYTES, "tmpfs_inodes": _TMPFS_INODES,
               "disable": list(_disable)}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work,
               "OMP_NUM_THREADS": "1"}
        with tempfile.TemporaryFile() as code_file:
            code_file.write(code.encode("utf-8", errors="surrogatepass"))
            code_file.seek(0)
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [exe, "-I", "-S", "-c", _child_program(), "setup", json.dumps(cfg)],
                    stdin=code_file, stdout=out_w, stderr=err_w, pass_fds=(st_w, dt_w), env=env, cwd=work,
                    start_new_session=True, close_fds=True)
            except OSError as e:
                return ExecutionResult(False, "", "", error=f"Sandbox failed to start: {e}")
        for fd in (out_w, err_w, st_w, dt_w):
            os.close(fd)
        out_w = err_w = st_w = dt_w = None
        streams = {out_r: _Capped(max_output_bytes), err_r: _Capped(max_output_bytes), st_r: _Capped(2**20),
                   dt_r: _Capped(_DETAIL_BYTES)}
        killed = _collect(proc.pid, streams, start + float(timeout) + _GRACE_S)
        _kill_group(proc.pid)  # stragglers; the main process is a zombie until wait(), so the id is still ours
        proc.wait()
        return _result(proc.returncode, killed, streams[out_r], streams[err_r], streams[st_r], streams[dt_r])
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            proc.wait()
        for fd in (out_r, out_w, err_r, err_w, st_r, st_w, dt_r, dt_w):
            if fd is not None:
                os.close(fd)
        _remove_tree(work)


def _collect(pid: int, streams: dict, deadline: float) -> bool:
    """Read the pipes until they close; kill the group at the deadline. Returns True if it was killed."""
    import selectors
    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    killed, exited_at = False, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and _exited(pid):
                exited_at = now
                _kill_group(pid)  # anything left in the group (the pipes close when the last holder dies)
            if exited_at is None and now >= deadline:
                killed, exited_at = True, now
                _kill_group(pid)
            if exited_at is not None and now - exited_at > 2.0:
                break  # a holder outside the group (cannot happen with seccomp): stop waiting for it
            wait = 0.1 if exited_at is None else 0.05
            for key, _ in sel.select(max(0.0, min(wait, deadline - now)) if exited_at is None else wait):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if data:
                    streams[key.fd].add(data)
                else:
                    sel.unregister(key.fd)
        while not _exited(pid):
            if time.monotonic() >= deadline:
                killed = True
                _kill_group(pid)
                break
            time.sleep(0.01)
    finally:
        sel.close()
    return killed


def _result(returncode: int, killed: bool, out: _Capped, err: _Capped, status: _Capped,
            detail: _Capped) -> ExecutionResult:
    """The verdict from the exit status (the kernel's) and our own kill; the status pipe only says which layers
    held, and the detail pipe only gives a failure its error text (the code can write to it)."""
    sandbox, seen = {}, set()
    for line in status.data.decode("utf-8", errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        kind = msg.pop("kind", None)
        if kind in ("setup", "run") and kind not in seen:  # the child's own records come first, before the code
            sandbox.update(msg)
            seen.add(kind)
    ran = "run" in seen
    sandbox["returncode"] = returncode
    res = ExecutionResult(False, out.text(), err.text(), sandbox=sandbox)
    state = {code: name for name, code in _EXIT_CODES.items()}.get(returncode) if ran else None
    if state == "ok":
        res.success = True
    elif state is not None:
        lines = [ln.strip() for ln in detail.data.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        res.error = lines[-1] if lines else {"error": "Error", "timeout": "Execution timed out",
                                             "memory": "Memory limit exceeded"}[state]
        res.timeout, res.memory_exceeded = state == "timeout", state == "memory"
    elif killed:
        res.timeout, res.error = True, "Execution timed out (process killed)"
    else:
        sig = -returncode if returncode < 0 else (returncode - 128 if returncode > 128 else 0)
        if sig == signal.SIGXCPU:
            res.timeout, res.error = True, "Execution timed out (CPU time limit)"
        elif sig:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            res.error = f"Process killed by signal {name}"
        elif not ran:
            last = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            res.error = "Sandbox failed: " + (last[-1] if last else f"exit code {returncode}")
        else:
            res.error = f"Process exited (code {returncode}) before the code finished"
    return res


def describe_sandbox() -> dict:
    """The protections a run gets on this machine for this caller (runs `pass`)."""
    return execute_code("pass").sandbox
