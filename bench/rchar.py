#!/usr/bin/env python3
"""Runs a command and appends the bytes its process tree read to FILE; exits with its status.

The figure is `rchar` from /proc/PID/io (what its read/pread calls returned, page-cache hits
included), read while the finished process is still a zombie, so it counts every thread and
every child it waited for, to the end. bench/run.sh wraps GNU time in it:

    bench/rchar.py FILE /usr/bin/time -f '%e %M' -o TIMES CMD ARGS...
"""
import os
import subprocess
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: rchar.py FILE CMD ARGS...", file=sys.stderr)
        return 2
    out, cmd = sys.argv[1], sys.argv[2:]
    p = subprocess.Popen(cmd)
    # wait without reaping: /proc/PID/io stays readable until wait4 below
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    rchar = 0
    try:
        with open(f"/proc/{p.pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "rchar":
                    rchar = int(v)
    except OSError as e:
        print(f"rchar.py: /proc/{p.pid}/io: {e}", file=sys.stderr)
    rc = p.wait()
    with open(out, "w") as f:
        f.write(f"{rchar}\n")
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
