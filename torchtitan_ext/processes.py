"""The process tree of a torchrun job: torchrun starts each worker in a session of its own, so killing
torchrun's process group leaves the workers running. These helpers walk ``/proc`` instead (Linux)."""

from __future__ import annotations

import os
import signal

__all__ = ["descendants", "kill_tree"]


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
