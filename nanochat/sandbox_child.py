"""The sandbox's child side: what runs inside the sandboxed interpreters of nanochat/execution.py.

This file is not imported: execution.py passes its text as the `-c` program of a fresh `python -I -S`, so it
must stay standard-library only (Python >= 3.8 syntax). Its names are prefixed `_c_` to keep them apart from the
caller's. The layers it builds (namespaces, mounts, uid drop, limits, Landlock, seccomp, the Python guard) are
described in nanochat/execution.py.
"""
import json
import os
import signal
import sys

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_CLONE_THREAD = 0x00010000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 1024, 2048, 4096, 16384
_MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 22, 38

# (audit arch, {syscall: number}) per machine; the numbers are the kernel's ABI.
_C_SYSCALLS = {
    "x86_64": (0xC000003E, dict(
        socket=41, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
        pidfd_send_signal=424, pidfd_open=434, pidfd_getfd=438, ptrace=101, process_vm_readv=310,
        process_vm_writev=311, setsid=112, setpgid=109, unshare=272, setns=308, mount=165, umount2=166,
        pivot_root=155, chroot=161, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432,
        fspick=433, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, bpf=321,
        perf_event_open=298, userfaultfd=323, keyctl=250, add_key=248, request_key=249, execve=59,
        execveat=322, fork=57, vfork=58, clone=56, clone3=435)),
    "aarch64": (0xC00000B7, dict(
        socket=198, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
        pidfd_send_signal=424, pidfd_open=434, pidfd_getfd=438, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, setsid=157, setpgid=154, unshare=97, setns=268, mount=40, umount2=39,
        pivot_root=41, chroot=51, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432,
        fspick=433, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, bpf=280,
        perf_event_open=241, userfaultfd=282, keyctl=219, add_key=217, request_key=218, execve=221,
        execveat=281, clone=220, clone3=435)),
}


class _SandboxTimeout(BaseException):
    """Raised inside the code when its time is up (a BaseException, so `except Exception` does not eat it)."""


def _c_libc():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return ctypes, libc
    except Exception:  # an interpreter built without ctypes: the ctypes-based layers are skipped
        return None, None


def _c_emit(fd, obj):
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    except (OSError, ValueError, TypeError):
        pass


def _c_write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _c_mount(ctypes, libc, source, target, fstype, flags, data):
    enc = (lambda s: None if s is None else s.encode())
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _c_mountinfo():
    """[(mount point, per-mount options)] from /proc/self/mountinfo, octal escapes decoded."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6:
                continue
            raw, point, i = parts[4], [], 0
            while i < len(raw):
                if raw[i] == "\\" and raw[i + 1:i + 4].isdigit():
                    point.append(chr(int(raw[i + 1:i + 4], 8)))
                    i += 4
                else:
                    point.append(raw[i])
                    i += 1
            out.append(("".join(point), parts[5].split(",")))
    return out


def _c_setup_mounts(ctypes, libc, cfg, info):
    """Inside the new mount + pid namespaces (mounts already private): fresh /proc, tmpfs folder, rest read-only."""
    work = cfg["work"]
    try:
        _c_mount(ctypes, libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
        info["proc_mounted"] = True
    except OSError as e:
        info["proc_mounted"], info["proc_error"] = False, str(e)
    uid, gid = cfg["drop"] if (cfg["drop"] and os.geteuid() == 0) else (os.getuid(), os.getgid())
    try:
        opts = "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (cfg["tmpfs_bytes"], cfg["tmpfs_inodes"], uid, gid)
        _c_mount(ctypes, libc, "tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts)
        info["tmpfs_workdir"] = True
    except OSError as e:
        info["tmpfs_workdir"], info["tmpfs_error"] = False, str(e)
        try:  # keep the folder writable as a mount of its own when the rest turns read-only
            _c_mount(ctypes, libc, work, work, None, _MS_BIND, None)
        except OSError:
            pass
    keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
            "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}
    done, failed = 0, []
    for point, opts in _c_mountinfo():
        if point == work:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for opt in opts:
            flags |= keep.get(opt, 0)
        if not flags & (_MS_NOATIME | _MS_RELATIME):
            flags |= _MS_STRICTATIME  # locked atime flags must be passed unchanged (user namespaces)
        try:
            _c_mount(ctypes, libc, None, point, None, flags, None)
            done += 1
        except OSError:
            failed.append(point)
    info["readonly_remounts"], info["readonly_failed"] = done, sorted(set(failed))
    info["mount_namespace"] = True


def _c_outer_wait(pid, cfg):
    """The setup process outside the new pid namespace: wait for PID 1 there and exit like it (the caller judges
    the run by that exit status). It keeps no copy of the status pipe, so none is left open once PID 1 closes its."""
    os.close(cfg["status_fd"])
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _c_setup(cfg, src):
    """Stage 1: namespaces, mounts, the uid drop; then exec stage 2 in a fresh interpreter."""
    ctypes, libc = _c_libc()
    info = {"mode": "none", "net_namespace": False, "pid_namespace": False, "mount_namespace": False}
    root = os.geteuid() == 0
    if cfg["namespaces"] and libc is not None:
        flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(ctypes.c_int(flags if root else flags | _CLONE_NEWUSER)) == 0:
            info["mode"] = "root-namespaces" if root else "user-namespaces"
            if not root:
                try:
                    _c_write_file("/proc/self/setgroups", "deny")
                    _c_write_file("/proc/self/uid_map", "%d %d 1" % (uid, uid))
                    _c_write_file("/proc/self/gid_map", "%d %d 1" % (gid, gid))
                except OSError as e:
                    info["userns_map_error"] = str(e)
            info["net_namespace"] = info["pid_namespace"] = True
            try:  # before any mount: nothing done below may propagate back to the host
                _c_mount(ctypes, libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)
                private = True
            except OSError as e:
                private, info["mount_error"] = False, str(e)
            pid = os.fork()
            if pid:
                _c_outer_wait(pid, cfg)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if private:
                _c_setup_mounts(ctypes, libc, cfg, info)
        else:
            info["unshare_error"] = os.strerror(ctypes.get_errno())
    try:
        os.chdir(cfg["work"])
    except OSError:
        pass
    if cfg["drop"] and root:
        uid, gid = cfg["drop"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _c_emit(cfg["status_fd"], dict(info, kind="setup"))
    os.set_inheritable(cfg["status_fd"], True)
    os.set_inheritable(cfg["detail_fd"], True)
    exe = sys.executable
    os.execve(exe, [exe, "-I", "-S", "-c", _c_program(src), "run", json.dumps(cfg)], dict(os.environ))


def _c_program(src):
    return "_C_SRC = %r\nexec(compile(_C_SRC, '<nanochat-sandbox>', 'exec'))\n_c_main(_C_SRC)\n" % src


def _c_landlock(ctypes, libc, work):
    """Reads: system + interpreter folders only; writes: the run's folder (+ /dev/null). Returns the ABI or 0."""
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset VERSION
    if abi < 1:
        return 0
    EXEC, WRITE, READ, READDIR = 1, 2, 4, 8
    write_all = 2 | 16 | 32 | 64 | 128 | 256 | 512 | 1024 | 2048 | 4096  # write, remove, make_*
    trunc = (1 << 14) if abi >= 3 else 0
    write_all |= ((1 << 13) if abi >= 2 else 0) | trunc | ((1 << 15) if abi >= 5 else 0)
    read = EXEC | READ | READDIR
    handled = read | write_all
    file_rights = EXEC | WRITE | READ | trunc | ((1 << 15) if abi >= 5 else 0)

    class Attr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = Attr(handled)
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    readable = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys",
                sys.prefix, sys.exec_prefix, getattr(sys, "base_prefix", sys.prefix),
                getattr(sys, "base_exec_prefix", sys.exec_prefix), os.path.dirname(os.path.realpath(sys.executable))]
    readable += [p for p in sys.path if p]
    rules = [(p, read) for p in readable] + [(os.devnull, READ | WRITE | trunc), (work, handled)]
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                import stat
                rights &= handled
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= file_rights
                rule = PathBeneath(rights, fd)
                libc.syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
            finally:
                os.close(fd)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        ok = libc.syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0  # landlock_restrict_self
    finally:
        os.close(ruleset)
    return abi if ok else 0


def _c_seccomp(ctypes, libc):
    """Install the seccomp filter described in the module docstring. Returns True when in force."""
    table = _C_SYSCALLS.get(os.uname().machine)
    if table is None:
        return False
    arch, nr = table
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    eperm = [n for name, n in nr.items() if name not in ("clone", "clone3")]
    # Program: check arch; load nr; [x32 bit]; one JEQ per denied call; default allow; clone flag check; returns.
    code = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    jumps = []  # (index, label)
    if arch == 0xC000003E:
        jumps.append((len(code), "eperm"))
        code.append((JGE, 0, 0, 0x40000000))
    for n in eperm:
        jumps.append((len(code), "eperm"))
        code.append((JEQ, 0, 0, n))
    jumps.append((len(code), "enosys"))
    code.append((JEQ, 0, 0, nr["clone3"]))
    jumps.append((len(code), "clone"))
    code.append((JEQ, 0, 0, nr["clone"]))
    code.append((RET, 0, 0, ALLOW))
    labels = {"clone": len(code)}
    code.append((LD, 0, 0, 16))  # low 32 bits of args[0] (clone flags) on little-endian
    code.append((JSET, 0, 1, _CLONE_THREAD))  # thread -> next (allow), process -> skip to eperm
    code.append((RET, 0, 0, ALLOW))
    labels["eperm"] = len(code)
    code.append((RET, 0, 0, ERRNO | 1))
    labels["enosys"] = len(code)
    code.append((RET, 0, 0, ERRNO | 38))
    for i, label in jumps:
        op, _, jf, k = code[i]
        code[i] = (op, labels[label] - i - 1, jf, k)

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(code))(*[Filter(*ins) for ins in code])
    prog = Prog(len(code), filters)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(_PR_SET_SECCOMP, 2, ctypes.byref(prog), 0, 0) == 0


def _c_guard(work):
    """Upstream-style reliability guard: disable destructive functions (bypassable; the OS layers hold)."""
    import builtins
    import faulthandler
    import shutil
    import socket
    import subprocess

    faulthandler.disable()
    root = os.path.realpath(work)

    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError("%s is disabled in the sandbox" % name)
        return refuse

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already open descriptor
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None:
            path = os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    def checked(name, fn, positions):
        def wrapper(*args, **kwargs):
            for pos in positions:
                if pos < len(args):
                    dfd = kwargs.get("dir_fd") if pos == 0 else kwargs.get("dst_dir_fd", kwargs.get("dir_fd"))
                    if pos == 0 and "src_dir_fd" in kwargs:
                        dfd = kwargs["src_dir_fd"]
                    if not inside(args[pos], dfd):
                        raise PermissionError("%s outside the sandbox folder is disabled: %r" % (name, args[pos]))
            return fn(*args, **kwargs)
        return wrapper

    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "putenv",
                 "unsetenv", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid",
                 "setresgid", "setgroups", "setsid", "setpgid", "setpgrp", "chroot", "fchdir", "fchmod", "fchown",
                 "lchmod", "lchown", "lchflags", "chflags", "plock", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, blocked("os." + name))
    for name, positions in (("remove", (0,)), ("unlink", (0,)), ("rmdir", (0,)), ("removedirs", (0,)),
                            ("rename", (0, 1)), ("renames", (0, 1)), ("replace", (0, 1)), ("truncate", (0,)),
                            ("chmod", (0,)), ("chown", (0,)), ("link", (0, 1)), ("symlink", (1,))):
        setattr(os, name, checked("os." + name, getattr(os, name), positions))
    shutil.rmtree = checked("shutil.rmtree", shutil.rmtree, (0,))
    shutil.move = checked("shutil.move", shutil.move, (0, 1))
    shutil.chown = checked("shutil.chown", shutil.chown, (0,))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, blocked("subprocess." + name))

    class NoNetworkSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:  # wrapping an existing descriptor (socketpair, fromfd) stays possible
                raise PermissionError("network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = NoNetworkSocket
    socket.create_connection = blocked("socket.create_connection")
    socket.create_server = blocked("socket.create_server")
    builtins.exit = blocked("exit")
    builtins.quit = blocked("quit")
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _c_read_code():
    """All of stdin (the code to run); stdin is then /dev/null, so the code reads nothing the caller sends."""
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return b"".join(chunks)


def _c_set_limits(cfg):
    """The rlimits: no core files, file size, open files, processes, CPU time, memory. Returns what failed."""
    import resource
    errors = []

    def limit(res, value):
        try:
            hard = resource.getrlimit(res)[1]
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError) as e:
            errors.append("%s: %s" % (res, e))

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    limit(resource.RLIMIT_NPROC, cfg["max_processes"])
    cpu = int(cfg["timeout"]) + 2
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError) as e:
        errors.append("cpu: %s" % e)
    if cfg["memory"]:
        limit(resource.RLIMIT_AS, cfg["memory"])
        limit(resource.RLIMIT_DATA, cfg["memory"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return errors


def _c_confine(cfg, ctypes, libc):
    """Landlock, seccomp and the guard, each unless cfg["disable"] names it. Returns which of them hold."""
    disabled = set(cfg.get("disable", ()))
    info = {"landlock_abi": 0, "seccomp": False}
    if libc is not None and "landlock" not in disabled:
        try:
            info["landlock_abi"] = _c_landlock(ctypes, libc, cfg["work"])
        except Exception as e:
            info["landlock_error"] = repr(e)
    if libc is not None and "seccomp" not in disabled:
        try:
            info["seccomp"] = _c_seccomp(ctypes, libc)
        except Exception as e:
            info["seccomp_error"] = repr(e)
    info["guard"] = "guard" not in disabled
    if info["guard"]:
        _c_guard(cfg["work"])
    return info


def _c_execute(code, timeout):
    """Run the code as __main__ with a wall-clock alarm after `timeout` seconds. Returns (status, error text):
    status "ok" (the code ran to its end), "timeout", "memory" or "error".

    What this calls once the code has run is bound before it runs: the code can rebind module attributes
    (signal.setitimer, traceback.*, sys.stdout, sys.modules["__main__"]'s functions), and must not get its own
    functions called in their place after it failed. The status is decided by the except clause alone, before the
    error text (str(e) may be the code's own method)."""
    import builtins
    import traceback

    timed_out, setitimer, itimer = _SandboxTimeout, signal.setitimer, signal.ITIMER_REAL
    format_exception_only, print_exception = traceback.format_exception_only, traceback.print_exception
    streams = (sys.stdout, sys.stderr)

    def on_alarm(signum, frame):
        raise timed_out()

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    status, error = "ok", None
    try:
        compiled = compile(code, "<string>", "exec")
        signal.signal(signal.SIGALRM, on_alarm)
        setitimer(itimer, timeout)
        try:
            exec(compiled, namespace)
        finally:
            setitimer(itimer, 0)
    except timed_out:
        status, error = "timeout", "Execution timed out"
    except MemoryError as e:
        status = "memory"
        error = ("Memory limit exceeded: %s" % e) if str(e) else "Memory limit exceeded"
    except BaseException as e:
        status = "error"
        try:
            lines = format_exception_only(type(e), e)
            error = lines[-1].strip() if lines else type(e).__name__
            print_exception(type(e), e, e.__traceback__.tb_next, file=streams[1])
        except BaseException:
            error = type(e).__name__
    for stream in streams:
        try:
            stream.flush()
        except BaseException:
            pass
    return status, error


def _c_run(cfg, src):
    """Stage 2: limits, Landlock, seccomp, guard; report them and close the status pipe; then run the code and
    end with the exit status that says how it ended (cfg["exit_codes"]).

    The code runs in this process, so anything it can reach it can forge: the status pipe is closed before it
    starts, and the verdict is this process's exit status, which the caller reads from the kernel (waitpid). The
    error text goes to the detail pipe, which the caller only reads as text for a run that failed."""
    # bound before the code runs, which can rebind os.* and reach cfg
    exit_process, write, codes, detail_fd = os._exit, os.write, dict(cfg["exit_codes"]), cfg["detail_fd"]
    ctypes, libc = _c_libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    code = _c_read_code()
    try:
        os.chdir(cfg["work"])
    except OSError:
        pass
    info = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    import traceback  # noqa: F401 -- _c_execute's; loaded before the limits, under which an import could fail
    info["rlimit_errors"] = _c_set_limits(cfg)
    info.update(_c_confine(cfg, ctypes, libc))
    _c_emit(cfg["status_fd"], dict(info, kind="run"))
    os.close(cfg["status_fd"])
    status, error = _c_execute(code, cfg["timeout"])
    if error:
        try:
            write(detail_fd, ("\n" + error).encode("utf-8", "replace")[:4096])  # a line of its own
        except BaseException:
            pass
    exit_process(codes[status])


def _c_main(src):
    stage, cfg = sys.argv[1], json.loads(sys.argv[2])
    if stage == "setup":
        _c_setup(cfg, src)
    else:
        _c_run(cfg, src)
