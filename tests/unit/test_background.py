"""Background work runs at a lowered priority, and so do the commands it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from blockguard.engine.background import NICE, run_in_background


def test_background_work_and_its_commands_run_lowered_and_the_caller_is_untouched(
    caplog,
) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def work() -> None:
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        seen["child"] = int(out)

    run_in_background(work, "test work").join(30)
    assert seen == {"thread": max(mine, NICE), "child": max(mine, NICE)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine

    def fails() -> None:
        raise RuntimeError("boom")

    with caplog.at_level("ERROR"):
        run_in_background(fails, "failing work").join(30)
    assert "background work failing work failed" in caplog.text and "boom" in caplog.text
