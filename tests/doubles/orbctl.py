"""A TEST DOUBLE of OrbStack's ``orbctl``, for vmlease's contract tests. Not OrbStack.

Answers the machine commands vmlease uses (create, start, stop, delete,
list, info, run, push, pull) with OrbStack's JSON shapes and messages (see
tests/data/orbstack/), running each machine as a QEMU VM (see _engine.py).
Whatever the image, the guest is vmlease's tiny image; commands run as root
whatever ``--user`` says. ``stop`` without a name stops every machine, as
the real one stops OrbStack itself.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tests.doubles import _engine as engine

TOOL = "orbctl"


def usage(message: str) -> int:
    sys.stderr.write(f"Error: {message}\n")
    return 1


def not_found(name: str) -> int:
    sys.stderr.write(f"machine not found: {name}\n")
    return 1


def record(name: str, machine: dict[str, Any]) -> dict[str, Any]:
    distro, _, version = machine["image"].partition(":")
    return {
        "id": machine["id"],
        "name": name,
        "image": {
            "distro": distro,
            "version": version or "current",
            "arch": machine.get("arch", "arm64"),
            "variant": "default",
        },
        "config": {"isolated": False, "default_username": machine.get("user", "")},
        "builtin": False,
        "state": machine["state"],
    }


def options(args: list[str], flags: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split ``args`` into the given ``--long``/``-s`` options and the rest (up to the command)."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key = flags.get(arg)
        if key is not None:
            if i + 1 >= len(args):
                raise SystemExit(usage(f"flag needs an argument: {arg}"))
            found[key] = args[i + 1]
            i += 2
            continue
        if arg in ("-f", "--force"):
            found["force"] = "1"
            i += 1
            continue
        rest = args[i:]
        break
    return found, rest


def dispatch(command: str, args: list[str]) -> int:
    if command == "create":
        opts, rest = options(args, {"-a": "arch", "--arch": "arch", "-u": "user", "--user": "user"})
        if len(rest) != 2:
            return usage("create takes DISTRO[:VERSION] NAME")
        image, name = rest
        with engine.locked() as table:
            if name in table:
                sys.stderr.write(f"[-32098] create '{name}': machine already exists\n")
                return 1
            table[name] = {
                "id": engine.new_id(),
                "image": image,
                "arch": opts.get("arch", "arm64"),
                "user": opts.get("user", ""),
                "state": "creating",
                "created": time.time(),
            }
        try:
            engine.make_machine(name, {})
        except Exception as exc:  # the real one reports a failed create the same way
            with engine.locked() as table:
                table.pop(name, None)
            sys.stderr.write(f"[-32098] create '{name}': crashed on startup: {exc}\n")
            return 1
        with engine.locked() as table:
            table[name]["state"] = "running"
        return 0

    if command == "list":
        opts, _ = options(args, {"-f": "format", "--format": "format"})
        table = engine.machines()
        if opts.get("format") == "json":
            print(json.dumps([record(n, m) for n, m in table.items()]))
        else:
            print("NAME  STATE  DISTRO  VERSION  ARCH")
            for n, m in table.items():
                print(n, m["state"], m["image"], m.get("arch", "arm64"))
        return 0

    if command == "info":
        opts, rest = options(args, {"-f": "format", "--format": "format"})
        if not rest:
            return usage("info takes a machine name")
        table = engine.machines()
        if rest[0] not in table:
            return not_found(rest[0])
        print(json.dumps({"record": record(rest[0], table[rest[0]]), "disk_size": 1 << 30}))
        return 0

    if command in ("start", "stop"):
        names = args or list(engine.machines())
        table = engine.machines()
        for name in names:
            if name not in table:
                return not_found(name)
        for name in names:
            if command == "start" and table[name]["state"] != "running":
                engine.start_machine(name)
            elif command == "stop" and table[name]["state"] == "running":
                engine.stop_machine(name)
            with engine.locked() as live:
                live[name]["state"] = "running" if command == "start" else "stopped"
        return 0

    if command == "delete":
        opts, rest = options(args, {})
        if not rest:
            return usage("delete takes a machine name")
        for name in rest:
            if name not in engine.machines():
                return not_found(name)
            engine.delete_machine(name)
            with engine.locked() as table:
                table.pop(name, None)
        return 0

    if command == "run":
        opts, rest = options(
            args,
            {
                "-m": "machine",
                "--machine": "machine",
                "-u": "user",
                "--user": "user",
                "-w": "workdir",
                "--workdir": "workdir",
            },
        )
        name = opts.get("machine", "")
        table = engine.machines()
        if name not in table:
            return not_found(name)
        if table[name]["state"] != "running":
            sys.stderr.write(f"machine '{name}' is not running\n")
            return 1
        if not rest:
            return usage("run needs a command")
        return engine.run(name, rest, opts.get("workdir"))

    if command in ("push", "pull"):
        opts, rest = options(args, {"-m": "machine", "--machine": "machine"})
        name = opts.get("machine", "")
        if name not in engine.machines():
            return not_found(name)
        if len(rest) != 2:
            return usage(f"{command} takes SOURCE DEST")
        try:
            if command == "push":
                engine.push(name, rest[0], rest[1])
            else:
                engine.pull(name, rest[0], rest[1])
        except Exception as exc:
            sys.stderr.write(f"{command}: {exc}\n")
            return 1
        return 0

    if command == "status":
        print("Running")
        return 0

    return usage(f'unknown command "{command}" for "orbctl"')


if __name__ == "__main__":
    sys.exit(engine.main(TOOL, sys.argv[1:], dispatch))
