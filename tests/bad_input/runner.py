"""Run entry-point scripts as forked child processes after importing the heavy packages once.

    python tests/bad_input/runner.py jobs.json results.json [parallel]

Each job is ``{"script": path, "argv": [...], "cwd": dir, "env": {...}, "stdout": file, "stderr": file}``.
A child runs the script exactly as ``python script argv...`` would (``__main__``, its folder first on
``sys.path``, an uncaught exception printed with its traceback and exit status 1), with stdout and
stderr written to the job's files; the results file gets each job's exit status. Forking after the
imports saves the ~10 s interpreter start-up (torch, transformers, datasets) of every case.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def _child(job: dict) -> None:
    os.chdir(job["cwd"])
    for key, value in job.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    code = 0
    try:
        sys.argv = [job["script"], *job["argv"]]
        sys.path[0] = os.path.dirname(os.path.abspath(job["script"]))
        runpy.run_path(job["script"], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    # Heavy imports once, in the parent; every child inherits them.
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import minidistill.evaluation.lm_eval_runner  # noqa: F401
    import minidistill.publish.hub  # noqa: F401
    import minidistill.publish.model_card  # noqa: F401
    import minidistill.prune.pipeline  # noqa: F401
    import minidistill.train  # noqa: F401

    results: dict[str, int] = {}
    running: dict[int, str] = {}
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(job)
            running[pid] = job["name"]
        pid, status = os.wait()
        results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
