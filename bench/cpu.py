"""CPU used by groups of processes (and left idle on the machine) over a time window,
read from /proc: shows who saturates the cores during a scenario."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")

# group name -> the pids it holds right now (resolved at each snapshot: trees change)
Groups = dict[str, Callable[[], list[int]]]


@dataclass(frozen=True)
class Snapshot:
    groups: dict[str, dict[int, int]]  # group -> pid -> ticks
    everyone: dict[int, tuple[str, int]]  # pid -> (command name, ticks), every process
    idle: int


def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return found


def children(pid: int, command: str) -> list[int]:
    """Direct children of `pid` whose command line ends with the word `command`."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, task.read_text().split()):
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    if command.encode() in argv[-2:]:
                        found.append(child)
    return found


def stat(pid: int, of: str = "stat") -> tuple[str, int]:
    """Command name and user + system CPU ticks of a process so far (0 if it is gone);
    `of`: the stat file under /proc/<pid> (`task/<pid>/stat`: its main thread alone)."""
    try:
        text = Path(f"/proc/{pid}/{of}").read_text()
    except OSError:
        return "", 0
    close = text.rindex(")")
    fields = text[close + 2 :].split()
    return text[text.index("(") + 1 : close], int(fields[11]) + int(fields[12])


def split(pid: int) -> dict[str, int]:
    """CPU ticks so far of a process's main thread, of its other threads (I/O, fsync,
    lazy free) and of its descendants (a forked AOF rewrite or RDB save), apart."""
    process = stat(pid)[1]  # every thread's
    name, main = stat(pid, f"task/{pid}/stat")
    if not name:  # gone
        main = process
    forked = sum(stat(child)[1] for child in tree(pid) if child != pid)
    return {"main thread": main, "other threads": process - main, "forked": forked}


def idle_ticks() -> int:
    """Idle + iowait ticks of the whole machine so far."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(cpu[4]) + int(cpu[5])


def snapshot(groups: Groups) -> Snapshot:
    everyone = {int(p.name): stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return Snapshot(
        {name: {pid: stat(pid)[1] for pid in pids()} for name, pids in groups.items()},
        everyone,
        idle_ticks(),
    )


def cores(before: Snapshot, after: Snapshot, seconds: float) -> dict[str, float]:
    """Average cores busy per group between two snapshots; `other` is the rest of the busy
    time (other processes, the kernel's threads) and `idle` includes I/O wait."""
    used: dict[str, float] = {}
    for name, now in after.groups.items():
        then = before.groups.get(name, {})
        used[name] = sum(t - then.get(pid, 0) for pid, t in now.items()) / TICKS_PER_S / seconds
    idle = (after.idle - before.idle) / TICKS_PER_S / seconds
    used["other"] = max(0.0, (os.cpu_count() or 1) - sum(used.values()) - idle)
    used["idle"] = idle
    return used


def others(before: Snapshot, after: Snapshot, seconds: float, top: int = 3) -> dict[str, float]:
    """The busiest processes outside the groups, by command name, in cores."""
    grouped = {pid for pids in after.groups.values() for pid in pids}
    by_name: dict[str, float] = {}
    for pid, (name, t) in after.everyone.items():
        if pid not in grouped:
            delta = t - before.everyone.get(pid, (name, 0))[1]
            by_name[name] = by_name.get(name, 0.0) + delta / TICKS_PER_S / seconds
    busiest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(c, 2) for name, c in busiest if c >= 0.02}
