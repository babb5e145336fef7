#!/usr/bin/env python3
"""What plain ssh carries over the shaped link of the network lab (issue 11), as the
reference for blockguard's own transfer figure (the issue's target: >= 0.9 of the link).

    .venv/bin/python bench/bench_link.py [--rate-mib 20] [--mib 100] [--rounds 3]

Run as root, after scripts/bootstrap (which provides sshd). Sets up the lab of
tests/support/netlab.py with a ``tbf`` rate on both directions of its veth, then, per
round, pipes ``--mib`` MiB of random bytes through ``ssh ... 'cat >/dev/null'`` from the
protected namespace to the target. The clock starts when the remote side says it is
ready (the ssh handshake is not counted; it is printed apart) and stops when ssh exits
after the last byte was read. Prints each round and the median of measured rate / tbf
rate; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockguard.core.units import MiB, format_rate
from tests.support.netlab import NetLab, netlab

CHUNK = MiB


def one_round(lab: NetLab, size: int) -> tuple[float, float]:
    """Send ``size`` bytes; returns (handshake seconds, transfer seconds)."""
    # One random MiB, sent again and again: ssh does not compress here (-F none).
    block = os.urandom(CHUNK)
    argv = lab.in_prot([*lab.ssh_argv(), "--", "echo ready; exec cat >/dev/null"])
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    if process.stdout.readline() != b"ready\n":
        process.kill()
        _, err = process.communicate()
        raise SystemExit(f"ssh did not reach the target: {err.decode(errors='replace')}")
    ready = time.monotonic()
    left = size
    while left > 0:
        n = min(left, CHUNK)
        process.stdin.write(block[:n])
        left -= n
    process.stdin.close()
    process.stdout.read()
    err = process.stderr.read() if process.stderr else b""
    process.wait()
    done = time.monotonic()
    if process.returncode != 0:
        raise SystemExit(f"ssh exited {process.returncode}: {err.decode(errors='replace')}")
    return ready - started, done - ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-mib", type=float, default=20.0, help="tbf rate, MiB/s")
    parser.add_argument("--mib", type=int, default=100, help="MiB sent per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rate = int(args.rate_mib * MiB)
    size = args.mib * MiB
    ratios = []
    with netlab(rate=rate) as lab:
        print(f"link: tbf {format_rate(rate)} both ways; {args.mib} MiB per round")
        for n in range(1, args.rounds + 1):
            handshake, seconds = one_round(lab, size)
            measured = size / seconds
            ratios.append(measured / rate)
            print(
                f"round {n}: {format_rate(measured)} in {seconds:.2f} s"
                f" (handshake {handshake:.2f} s), measured/tbf {measured / rate:.3f}"
            )
    print(f"median measured/tbf rate: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
