"""Runs one completion's tests inside the sandbox. Standalone: the standard library only.

stdin: one JSON object ``{"nonce", "code", "timeout", "max_output", "tests": [test, ...]}``,
where a test is ``{"kind": "assert", "code": str}`` (run after the solution, in a copy of its
namespace; passes when it raises nothing) or ``{"kind": "io", "input": str}`` (the solution run
as ``__main__`` with that stdin; its stdout is sent back and compared by the parent).
stdout: for each test, a line ``<nonce> {"test": i, "ok": bool, "output": str, "error": str}``.
Lines without the nonce (the solution writing to fd 1 itself) are ignored by the parent.
"""

import io
import json
import os
import signal
import sys


def _alarm(signum, frame):
    raise TimeoutError("test timed out")


def _describe(error):
    return f"{type(error).__name__}: {error}"[:300]


def main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    channel = os.dup(1)
    nonce = job["nonce"]
    timeout = float(job["timeout"])
    max_output = int(job["max_output"])
    signal.signal(signal.SIGALRM, _alarm)
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""))

    def report(index, ok, output="", error=""):
        line = json.dumps({"test": index, "ok": ok, "output": output, "error": error})
        os.write(channel, f"{nonce} {line}\n".encode())

    def run(code, namespace, stdin_text):
        """Exec ``code``; returns (finished normally, its stdout, error text)."""
        captured = io.StringIO()
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin_text.encode("utf-8")))
        sys.stdout = captured
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(code, namespace)
            ok, error = True, ""
        except SystemExit as done:
            ok = done.code in (None, 0)
            error = "" if ok else f"SystemExit: {done.code}"
        except BaseException as failure:
            ok, error = False, _describe(failure)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout = sys.__stdout__
        output = captured.getvalue()
        if len(output) > max_output:
            ok, output, error = False, output[:max_output], "output too long"
        return ok, output, error

    try:
        solution = compile(job["code"], "solution.py", "exec")
    except (SyntaxError, ValueError) as failure:
        for index in range(len(job["tests"])):
            report(index, False, error=_describe(failure))
        return
    module = None
    for index, test in enumerate(job["tests"]):
        if test["kind"] == "io":
            report(index, *run(solution, {"__name__": "__main__"}, test["input"]))
            continue
        if module is None:
            module = {"__name__": "solution"}
            loaded, _, error = run(solution, module, "")
            if not loaded:
                module = error
        if isinstance(module, str):  # the solution itself failed: every assert test fails
            report(index, False, error=module)
            continue
        try:
            check = compile(test["code"], f"test_{index}.py", "exec")
        except (SyntaxError, ValueError) as failure:
            report(index, False, error=_describe(failure))
            continue
        ok, _, error = run(check, dict(module), "")
        report(index, ok, error=error)


if __name__ == "__main__":
    main()
