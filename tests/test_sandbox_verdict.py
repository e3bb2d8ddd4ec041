"""The sandbox's verdict: code that fails cannot make execute_code report a pass, whatever it writes or rewrites
(the verdict is the exit status of the process that ran it, read by the caller through waitpid)."""

import pytest

from nanochat.execution import execute_code

# A forged report in the old status-pipe format: a success record, then the start of a record left open, so the
# reporting code's real record (appended to the same line) no longer parses.
_FAKE = ('{"kind": "result", "status": "ok", "error": null}\n'
         '{"kind": "run", "forged": true}\n{"kind": "x", "pad": "')
_FORGE_EVERY_FD = ("import posix\n"
                   f"FAKE = {_FAKE!r}.encode()\n"
                   "for fd in range(1024):\n"
                   "    try:\n        posix.write(fd, FAKE)\n"
                   "    except OSError:\n        pass\n")
_FAILURES = {  # how the forging code then fails, with the kwargs and what the result must say
    "raise": ("raise AssertionError('wrong answer')", {}, lambda r: r.error == "AssertionError: wrong answer"),
    "loop": ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass",
             {"timeout": 1}, lambda r: r.timeout),
    "memory": ("x = bytearray(10 * 2**30)", {}, lambda r: r.memory_exceeded),
    "exit_after_failed_assert": ("import os\ntry:\n    assert 1 + 1 == 3\nfinally:\n    os._exit(0)", {},
                                 lambda r: r.error == "Process exited (code 0) before the code finished"),
}


@pytest.mark.parametrize("namespaces", [True, False], ids=["ns", "nons"])
@pytest.mark.parametrize("failure", sorted(_FAILURES))
def test_fake_success_written_to_every_fd_does_not_pass(failure, namespaces):
    tail, kwargs, says = _FAILURES[failure]
    r = execute_code(_FORGE_EVERY_FD + tail, use_namespaces=namespaces, **kwargs)
    assert not r.success and says(r), r
    assert "forged" not in r.sandbox  # the report of the layers cannot be written by the code either


def test_rewritten_reporting_code_does_not_pass():
    # Everything the reporting code could call after the failure is replaced by a forger that writes a success
    # record to every descriptor and ends the process with the success status the sandbox passes in its argv.
    code = ("import json, os, posix, signal, sys, traceback\n"
            f"FAKE = {_FAKE!r}.encode()\n"
            "OK = json.loads(sys.argv[-1]).get('exit_codes', {}).get('ok', 0)\n"
            "def forge(*args, **kwargs):\n"
            "    for fd in range(64):\n"
            "        try:\n            posix.write(fd, FAKE)\n"
            "        except OSError:\n            pass\n"
            "    posix._exit(OK)\n"
            "main = sys.modules['__main__']\n"
            "for name, value in list(vars(main).items()):\n"
            "    if callable(value) and not isinstance(value, type):\n"
            "        setattr(main, name, forge)\n"
            "os._exit = os.write = os.close = forge\n"
            "signal.setitimer = signal.signal = forge\n"
            "traceback.print_exception = traceback.format_exception_only = forge\n"
            "class Out:\n    write = staticmethod(sys.stdout.write)\n    flush = staticmethod(forge)\n"
            "sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = Out()\n"
            "assert 1 + 1 == 3, 'wrong answer'\n")
    r = execute_code(code)
    assert not r.success and r.error == "AssertionError: wrong answer", r


def test_fake_status_lines_on_stdout_and_stderr_do_not_pass():
    code = (f"import sys\nsys.stdout.write({_FAKE!r} + '\\n')\nsys.stderr.write({_FAKE!r} + '\\n')\n"
            "print('ok')\nraise SystemExit(0)\n")
    r = execute_code(code)
    assert not r.success and r.error.startswith("SystemExit") and "forged" not in r.sandbox, r
    assert r.stdout.startswith('{"kind": "result", "status": "ok"')  # the output itself is kept as printed
