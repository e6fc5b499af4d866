"""The process tree of a torchrun job: torchrun starts each worker in a session of its own, so killing
torchrun's process group leaves the workers running. These helpers walk ``/proc`` instead (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["descendants", "kill_tree", "run_captured"]


def descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid``, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` (SIGKILL by default) to ``pid`` and to all its descendants."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, sig)
        except ProcessLookupError:
            pass


def run_captured(cmd: list[str], *, cwd, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` (a torchrun job) in a session of its own with stdout and stderr captured together.

    Returns ``(returncode, output)``; on timeout the whole process tree is killed and the return code is None.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun's workers run in sessions of their own: walk the whole tree
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out
