"""A TEST DOUBLE of the ``multipass`` command, for vmlease's contract tests. Not Multipass.

Answers the instance commands vmlease uses (launch, start, stop, delete,
purge, list, info, exec, transfer) with Multipass's JSON shapes (numbers as
strings where Multipass writes strings), messages and exit codes (see
tests/data/multipass/), running each instance as a QEMU VM (see
_engine.py). The guest is vmlease's tiny image whatever the image asked
for; its user is root, so a leading ``sudo`` is accepted and dropped.
``delete`` without ``--purge`` keeps the instance as ``Deleted`` (recoverable,
as in Multipass) and ``purge`` removes every deleted instance.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tests.doubles import _engine as engine

TOOL = "multipass"
# Multipass's return codes.
COMMAND_FAIL, COMMAND_LINE_ERROR = 1, 2


def fail(command: str, detail: str, code: int = COMMAND_FAIL) -> int:
    sys.stderr.write(f"{command} failed: {detail}\n")
    return code


def missing(command: str, name: str) -> int:
    return fail(command, f'The following errors occurred:\ninstance "{name}" does not exist')


def memory_mb(text: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    unit = text[-1].upper()
    return int(float(text[:-1]) * units[unit]) if unit in units else int(text) // (1 << 20)


def parse(args: list[str], flags: set[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(options, positional arguments, arguments after ``--``)."""
    opts: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return opts, positional, args[i + 1 :]
        if arg in flags:
            opts[arg] = args[i + 1]
            i += 2
            continue
        if arg.startswith("--"):
            opts[arg] = "1"
        else:
            positional.append(arg)
        i += 1
    return opts, positional, []


def info_entry(name: str, m: dict[str, Any]) -> dict[str, Any]:
    running = m["state"] == "Running"
    return {
        "cpu_count": str(m["cpus"]) if running else "",
        "disks": {"sda1": {"total": "5116440064", "used": "1699393536"}} if running else {},
        "image_hash": "b2d4d8e0b0a5",
        "image_release": "24.04 LTS",
        "ipv4": ["10.174.0.2"] if running else [],
        "load": [0.0, 0.01, 0.0] if running else [],
        "memory": {"total": m["memory_mb"] << 20, "used": 163930112} if running else {},
        "mounts": {},
        "release": "Ubuntu 24.04.1 LTS" if running else "",
        "snapshot_count": "0",
        "state": m["state"],
    }


def dispatch(command: str, args: list[str]) -> int:
    value_flags = {
        "--name",
        "-n",
        "--cpus",
        "-c",
        "--memory",
        "-m",
        "--disk",
        "-d",
        "--timeout",
        "--cloud-init",
        "--format",
        "--working-directory",
    }
    opts, positional, tail = parse(args, value_flags)

    if command == "launch":
        name = opts.get("--name") or opts.get("-n")
        if not name:
            return fail("launch", "the double needs --name", COMMAND_LINE_ERROR)
        with engine.locked() as table:
            if name in table:
                return fail("launch", f'instance "{name}" already exists')
            table[name] = {
                "image": positional[0] if positional else "lts",
                "cpus": int(opts.get("--cpus", "1")),
                "memory_mb": memory_mb(opts.get("--memory", "1G")),
                "state": "Starting",
                "created": time.time(),
            }
            record = dict(table[name])
        try:
            engine.make_machine(name, record)
        except Exception as exc:
            with engine.locked() as table:
                table.pop(name, None)
            return fail("launch", f"timed out waiting for response ({exc})", 5)
        with engine.locked() as table:
            table[name]["state"] = "Running"
        print(f"Launched: {name}")
        return 0

    if command == "list":
        table = engine.machines()
        shown = dict(table)
        if opts.get("--format") == "json":
            print(
                json.dumps(
                    {
                        "list": [
                            {
                                "ipv4": ["10.174.0.2"] if m["state"] == "Running" else [],
                                "name": n,
                                "release": "Ubuntu 24.04 LTS",
                                "state": m["state"],
                            }
                            for n, m in shown.items()
                        ]
                    },
                    indent=4,
                )
            )
        else:
            print("Name  State  IPv4  Image")
            for n, m in shown.items():
                print(n, m["state"], "--", "Ubuntu 24.04 LTS")
        return 0

    if command == "info":
        table = engine.machines()
        names = positional
        for name in names:
            if name not in table:
                return missing("info", name)
        print(
            json.dumps(
                {"errors": [], "info": {n: info_entry(n, table[n]) for n in names}}, indent=4
            )
        )
        return 0

    if command in ("start", "stop"):
        table = engine.machines()
        for name in positional:
            if name not in table or table[name]["state"] == "Deleted":
                return missing(command, name)
        for name in positional:
            state = table[name]["state"]
            if command == "start" and state != "Running":
                engine.start_machine(name)
            elif command == "stop" and state == "Running":
                engine.stop_machine(name)
            with engine.locked() as live:
                live[name]["state"] = "Running" if command == "start" else "Stopped"
        return 0

    if command == "delete":
        if "--all" in opts:
            return fail("delete", "the double does not delete --all", COMMAND_LINE_ERROR)
        table = engine.machines()
        for name in positional:
            if name not in table:
                return missing("delete", name)
        for name in positional:
            if "--purge" in opts or "-p" in opts:
                engine.delete_machine(name)
                with engine.locked() as live:
                    live.pop(name, None)
            else:
                if table[name]["state"] == "Running":
                    engine.stop_machine(name)
                with engine.locked() as live:
                    live[name]["state"] = "Deleted"
        return 0

    if command == "purge":
        for name, m in engine.machines().items():
            if m["state"] == "Deleted":
                engine.delete_machine(name)
                with engine.locked() as live:
                    live.pop(name, None)
        return 0

    if command == "exec":
        if not positional:
            return fail("exec", "exec needs an instance name", COMMAND_LINE_ERROR)
        name = positional[0]
        table = engine.machines()
        if name not in table:
            return missing("exec", name)
        if table[name]["state"] != "Running":
            return fail("exec", f'instance "{name}" is not running')
        argv = tail or positional[1:]
        if argv[:1] == ["sudo"]:
            argv = argv[1:]
            while argv and argv[0].startswith("-"):
                done = argv[0] == "--"
                argv = argv[1:]
                if done:
                    break
        if not argv:
            return fail("exec", "nothing to run", COMMAND_LINE_ERROR)
        return engine.run(name, argv, opts.get("--working-directory"))

    if command == "transfer":
        if len(positional) != 2:
            return fail("transfer", "transfer takes SOURCE DEST", COMMAND_LINE_ERROR)
        source, dest = positional
        table = engine.machines()
        try:
            if ":" in dest:
                name, path = dest.split(":", 1)
                if name not in table:
                    return missing("transfer", name)
                engine.push(name, source, path)
            else:
                name, path = source.split(":", 1)
                if name not in table:
                    return missing("transfer", name)
                engine.pull(name, path, dest)
        except Exception as exc:
            return fail("transfer", str(exc))
        return 0

    if command == "version":
        print("multipass   1.14.1 (test double)")
        return 0

    return fail("multipass", f"Unknown command '{command}'", COMMAND_LINE_ERROR)


if __name__ == "__main__":
    sys.exit(engine.main(TOOL, sys.argv[1:], dispatch))
