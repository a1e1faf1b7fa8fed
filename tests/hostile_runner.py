"""Runs many ``oss-convert`` commands as separate processes, cheaply: this process imports the
command line once, then forks one child per job, so that each job is a real process (its own exit
code, its own stderr, a crash is a crash) whose time and peak memory are measured by the kernel.

Usage: ``python hostile_runner.py JOBS.json RESULTS.json``. Each job is ``{"args": [...], "cwd": ...,
"seconds": N, "memory": BYTES}``; each result ``{"rc", "signal", "stdout", "stderr", "seconds",
"max_rss"}``. A child past ``seconds`` is killed by SIGALRM; one past ``memory`` of address space
fails its allocations (the bound the test asserts is on its resident peak, well below that).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # a forked child runs on the main thread only

import gguf  # noqa: E402,F401  imported before the fork: what the commands load lazily
import jinja2.sandbox  # noqa: E402,F401
import numpy  # noqa: E402,F401
import safetensors.numpy  # noqa: E402,F401

from oss_convert.cli.main import main  # noqa: E402


def run_child(job: dict, out_path: str, err_path: str) -> None:
    """In the child: the command, with stdout/stderr to files; exit with its code."""
    out = os.open(out_path, os.O_WRONLY)
    err = os.open(err_path, os.O_WRONLY)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(job["cwd"])
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
    signal_seconds = int(job["seconds"])
    import signal

    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(signal_seconds)
    sys.argv = ["oss-convert", *job["args"]]
    code = 70
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a crash: the traceback is what the test looks for
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_job(job: dict) -> dict:
    with tempfile.NamedTemporaryFile(delete=False) as out, tempfile.NamedTemporaryFile(delete=False) as err:
        pass
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(job, out.name, err.name)
        finally:
            os._exit(71)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - start
    result = {"rc": os.waitstatus_to_exitcode(status), "seconds": seconds, "max_rss": usage.ru_maxrss * 1024,
              "stdout": open(out.name, errors="replace").read(), "stderr": open(err.name, errors="replace").read()}
    os.unlink(out.name)
    os.unlink(err.name)
    return result


if __name__ == "__main__":
    jobs = json.load(open(sys.argv[1]))
    results = [run_job(job) for job in jobs]
    json.dump(results, open(sys.argv[2], "w"))
