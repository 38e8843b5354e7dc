"""The ``vmlease`` command: parses arguments, calls the library, prints.

No logic lives here that the library does not offer too. Each command
imports the parts of the library it uses when it runs, so ``vmlease`` starts
without loading what the command at hand does not need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmlease import __version__
from vmlease._errors import ConfigError, VMLeaseError
from vmlease._imagecli import add_image_commands
from vmlease._paths import megabytes, state_dir
from vmlease._present import Commands, age, seconds, table

if TYPE_CHECKING:
    from vmlease._ledger import Record

__all__ = ["main"]


def cmd_ls(args: argparse.Namespace) -> int:
    from vmlease._inventory import inventory
    from vmlease._ledger import VMState

    rows = inventory(state_dir(), include_gone=args.all)
    if args.json:
        print(json.dumps({"vms": [r.as_dict() for r in rows]}, indent=2))
        return 0
    if not rows:
        print("no VMs")
        return 0
    print(
        table(
            [
                "NAME",
                "BACKEND",
                "ARCH",
                "STATE",
                "ACTUAL",
                "OWNER",
                "AGE",
                "MEM",
                "DISK",
                "START",
                "SESSION",
                "PORTS",
            ],
            [
                [
                    r.record.name,
                    r.record.backend,
                    r.arch or "-",
                    r.record.state.value,
                    r.actual,
                    "-"
                    if r.record.state is VMState.GONE
                    else f"{r.status.value} (pid {r.record.owner.pid})",
                    age(r.age_s),
                    "-" if r.memory_bytes is None else megabytes(r.memory_bytes),
                    "-" if r.disk_bytes is None else megabytes(r.disk_bytes),
                    r.start or "-",
                    r.record.owner.session_id,
                    ",".join(f"127.0.0.1:{h}->{g}" for g, h in sorted(r.record.forwards.items())),
                ]
                for r in rows
            ],
        )
    )
    return 0


def _ask(records: list[Record]) -> bool:
    """The question ``cleanup --all`` asks before deleting VMs of live sessions too."""
    print(f"vmlease cleanup --all would delete these {len(records)} VMs, live sessions' too:")
    for r in records:
        print(f"  {r.name}  ({r.backend}, session {r.owner.session_id}, pid {r.owner.pid})")
    print("Delete them? [y/N] ", end="", flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def cmd_cleanup(args: argparse.Namespace) -> int:
    from vmlease._cleanup import cleanup

    if not (state_dir() / "ledger.sqlite3").exists() and not args.backend:
        # Nothing was ever created here (an always-run CI step after a job that made
        # no VM): nothing to do, and said so, with the place looked at.
        if args.json:
            print(json.dumps({"results": []}, indent=2))
        else:
            print(f"nothing to clean up: vmlease has created no VM in {state_dir()}")
        return 0
    outcomes = cleanup(
        state_dir(),
        everything=args.all,
        dry_run=args.dry_run,
        max_age_s=args.max_age,
        confirm=None if args.yes else _ask,
        sweep=args.backend,
    )
    # A VM left because its ownership is unproven needs a person, like a failure.
    failed = any(o.action.needs_a_person for o in outcomes)
    if args.json:
        print(json.dumps({"results": [o.as_dict() for o in outcomes]}, indent=2))
    elif not outcomes:
        print("nothing to clean up")
    else:
        print(
            table(
                ["NAME", "BACKEND", "WHY", "ACTION", "ERROR"],
                [[o.name, o.backend, o.why, o.action, o.error or ""] for o in outcomes],
            )
        )
    return 1 if failed else 0


def cmd_exec(args: argparse.Namespace) -> int:
    from vmlease._attach import exec_in

    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    result = exec_in(state_dir(), args.name, args.program, stdin=stdin, timeout_s=args.timeout)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.timed_out:
        print(f"vmlease: the command ran out of time ({args.timeout:g} s)", file=sys.stderr)
    return result.exit_code


def cmd_ssh(args: argparse.Namespace) -> int:
    from vmlease._attach import ssh_info

    info = ssh_info(state_dir(), args.name)
    argv = info.argv(args.program or None)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - an argument list, never a shell
    except OSError as exc:
        raise ConfigError(
            f"cannot run ssh ({exc.strerror}): install it with `apt-get install openssh-client`"
        ) from exc
    return 0  # not reached: ssh took this process over


def cmd_ssh_config(args: argparse.Namespace) -> int:
    from vmlease._attach import live_names, ssh_info

    names = args.names or live_names(state_dir())
    blocks = []
    code = 0
    for name in names:
        try:
            blocks.append(ssh_info(state_dir(), name).config(name))
        except VMLeaseError as exc:
            if args.names:  # asked for by name: say why not
                print(f"vmlease: {name}: {exc}", file=sys.stderr)
                code = 1
    print("\n".join(blocks), end="")
    return code


def cmd_inventory(args: argparse.Namespace) -> int:
    from vmlease._attach import inventory

    found = inventory(state_dir(), session_id=args.session)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "vms": [
                        {
                            "name": r.name,
                            "session_id": r.session_id,
                            "backend": r.backend,
                            "ssh": None
                            if r.ssh is None
                            else {
                                "host": r.ssh.host,
                                "port": r.ssh.port,
                                "user": r.ssh.user,
                                "key": str(r.ssh.key),
                                "known_hosts": str(r.ssh.known_hosts),
                            },
                            "why_not": r.why_not or None,
                        }
                        for r in found
                    ]
                },
                indent=2,
            )
        )
        return 0
    hosts: dict[str, object] = {}
    for r in found:
        if r.ssh is None:
            print(f"vmlease: {r.name} is left out: {r.why_not}", file=sys.stderr)
            continue
        hosts[r.name] = {
            "ansible_host": r.ssh.host,
            "ansible_port": r.ssh.port,
            "ansible_user": r.ssh.user,
            "ansible_ssh_private_key_file": str(r.ssh.key),
            "ansible_ssh_common_args": " ".join(
                f"-o {option}"
                for option in (
                    "IdentitiesOnly=yes",
                    f"UserKnownHostsFile={r.ssh.known_hosts}",
                    "StrictHostKeyChecking=yes",
                    "PasswordAuthentication=no",
                )
            ),
            "ansible_python_interpreter": "/usr/bin/python3",
            "vmlease_session": r.session_id,
        }
    # Ansible's YAML inventory format, written as JSON (which is YAML): save it as
    # hosts.json or hosts.yml and pass it with -i.
    print(json.dumps({"all": {"hosts": hosts}}, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from vmlease._checks import Severity
    from vmlease._doctor import doctor

    backend = args.backend or os.environ.get("VMLEASE_BACKEND") or "qemu"
    checks = doctor(state_dir(), backend)
    failed = any(c.status is Severity.FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        marks = {Severity.OK: "ok", Severity.WARN: "WARN", Severity.FAIL: "FAIL"}
        for c in checks:
            print(f"{marks[c.status]:<5} {c.name}: {c.message}")
        print("vmlease can make VMs here" if not failed else "vmlease cannot make VMs here yet")
    return 1 if failed else 0


def cmd_lock(args: argparse.Namespace) -> int:
    from vmlease._locks import Lock, run_holding

    return run_holding(Lock(args.name, state_dir=state_dir()), args.program, timeout_s=args.timeout)


def _add_ls(sub: Commands) -> None:
    """``vmlease ls``."""
    ls = sub.add_parser("ls", help="list the VMs vmlease owns")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--all", action="store_true", help="include deleted VMs")
    ls.set_defaults(func=cmd_ls)


def _add_cleanup(sub: Commands) -> None:
    """``vmlease cleanup``."""
    clean = sub.add_parser(
        "cleanup",
        help="delete VMs whose owners died or whose lease expired",
        description="Deletes only VMs recorded in the ledger; never anything else, "
        "whatever its name.",
    )
    clean.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    clean.add_argument(
        "--all", action="store_true", help="delete every VM vmlease owns, live sessions' too"
    )
    clean.add_argument("--yes", action="store_true", help="do not ask (with --all)")
    clean.add_argument(
        "--max-age",
        type=seconds,
        metavar="SECONDS",
        help="treat VMs older than this as expired (default: the lease each VM was given)",
    )
    clean.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help="also delete what backend NAME can prove abandoned, whoever made it "
        "(libvirt: vmlease domains whose lease ran out, on every host); repeatable",
    )
    clean.add_argument("--json", action="store_true", help="print JSON")
    clean.set_defaults(func=cmd_cleanup)


def _add_exec(sub: Commands) -> None:
    """``vmlease exec``."""
    run = sub.add_parser(
        "exec",
        help="run a command in a VM vmlease owns (a kept one, say); its exit code is ours",
        usage="vmlease exec [--timeout S] NAME -- COMMAND [ARG...]",
    )
    run.add_argument(
        "--timeout", type=seconds, metavar="S", help="kill the command after S seconds"
    )
    run.add_argument("name", help="the VM, as `vmlease ls` names it")
    run.set_defaults(func=cmd_exec)


def _add_doctor(sub: Commands) -> None:
    """``vmlease doctor``."""
    doc = sub.add_parser(
        "doctor",
        help="check this machine is ready for VMs, and say what to do if not",
        description="Checks the backend's programs and daemon, KVM, free disk, the image "
        "cache, the state directory and VMs left by dead owners. Exit status 1 if any check "
        "fails (warnings do not fail).",
    )
    doc.add_argument("--backend", help="the backend to check (default: $VMLEASE_BACKEND or qemu)")
    doc.add_argument("--json", action="store_true", help="print JSON")
    doc.set_defaults(func=cmd_doctor)


def _add_lock(sub: Commands) -> None:
    """``vmlease lock``."""
    lock = sub.add_parser(
        "lock",
        help="run a command holding a named lock (shared by every process of this user)",
        usage="vmlease lock [--timeout S] NAME -- COMMAND [ARG...]",
        description="Waits for the lock, runs the command, passes its exit status through. "
        "A holder that dies frees the lock at once; a wait that runs out names the holder.",
    )
    lock.add_argument(
        "--timeout", type=seconds, metavar="S", help="give up after waiting S seconds (exit 1)"
    )
    lock.add_argument("name", help="the lock's name: letters, digits, '_', '.', '-'")
    lock.set_defaults(func=cmd_lock)


def _add_ssh(sub: Commands) -> None:
    """``vmlease ssh`` and ``ssh-config``."""
    ssh = sub.add_parser(
        "ssh",
        help="open a shell in a VM over SSH, or run a command there",
        usage="vmlease ssh NAME [-- COMMAND [ARG...]]",
        description="Forwards the VM's port 22 to 127.0.0.1 if needed and runs ssh with "
        "this state directory's key and the VM's real host key (checking stays on).",
    )
    ssh.add_argument("name", help="the VM, as `vmlease ls` names it")
    ssh.set_defaults(func=cmd_ssh)
    sshc = sub.add_parser(
        "ssh-config",
        help="print OpenSSH config blocks for VMs (for ssh -F, scp -F, rsync -e, testinfra)",
    )
    sshc.add_argument("names", nargs="*", metavar="NAME", help="default: every running VM")
    sshc.set_defaults(func=cmd_ssh_config)


def _add_inventory(sub: Commands) -> None:
    """``vmlease inventory``."""
    inv = sub.add_parser(
        "inventory",
        help="print an inventory of running VMs for Ansible (or as JSON)",
        description="Prints the running VMs vmlease owns with how SSH reaches each (host, "
        "port, user, key, known_hosts). --format ansible (the default) is Ansible's YAML "
        "inventory format written as JSON: save it as hosts.json and run "
        "`ansible -i hosts.json all -m ping`. VMs without an SSH server or network are "
        "left out with a note on stderr. No VMs: an empty, valid inventory.",
    )
    inv.add_argument("--session", metavar="ID", help="only the VMs of this session")
    inv.add_argument(
        "--format", choices=("ansible", "json"), default="ansible", help="default: ansible"
    )
    inv.set_defaults(func=cmd_inventory)


def build_parser(*, for_images: bool = True) -> argparse.ArgumentParser:
    """The parser. ``for_images=False`` leaves the image recipes out of the help
    (loading them costs more than the other commands' whole start)."""
    parser = argparse.ArgumentParser(
        prog="vmlease", description="Disposable virtual machines for test suites."
    )
    parser.add_argument("--version", action="version", version=f"vmlease {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    _add_ls(sub)
    _add_cleanup(sub)
    _add_exec(sub)
    _add_doctor(sub)
    _add_lock(sub)
    _add_ssh(sub)
    _add_inventory(sub)
    add_image_commands(sub, for_images=for_images)
    return parser


#: Sub-commands that run a program: ``vmlease VERB [OPTIONS] NAME [--] PROGRAM [ARG...]``.
_RUNNERS = ("exec", "lock", "ssh")
#: Their options that take a value as the next word.
_VALUED = ("--timeout",)


def _split_program(words: list[str]) -> tuple[list[str], list[str]]:
    """Split the words of a program-running sub-command into its own and the program's.

    Options may stand before or after NAME, up to ``--``; everything after
    ``--`` is the program. Without ``--``, the program starts at the first
    word after NAME that is not an option. Either way an option vmlease does
    not know is left for argparse to refuse by name: it never runs.
    """
    if "--" in words:
        at = words.index("--")
        return words[:at], words[at + 1 :]
    positionals = 0
    at = 0
    while at < len(words):
        word = words[at]
        if word.startswith("-") and word != "-":
            at += 2 if word in _VALUED else 1
            continue
        positionals += 1  # the verb, then NAME, then the program
        if positionals == 3:
            return words[:at], words[at:]
        at += 1
    return words, []


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    words = list(sys.argv[1:] if argv is None else argv)
    verb = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(for_images=verb == "image")
    if verb not in _RUNNERS:
        return parser.parse_args(words)
    own, program = _split_program(words)
    usage = (
        "usage: vmlease ssh NAME [-- COMMAND [ARG...]]"
        if verb == "ssh"
        else f"usage: vmlease {verb} [--timeout S] NAME -- COMMAND [ARG...]"
    )
    args, extra = parser.parse_known_args(own)
    unknown = [w for w in extra if w.startswith("-")]
    if unknown:
        parser.exit(2, f"vmlease {verb}: unknown option {unknown[0]}; {usage}\n")
    if extra:
        parser.exit(2, f"vmlease {verb}: unexpected {extra[0]!r} before --; {usage}\n")
    if not program and verb != "ssh":  # ssh alone opens a shell
        parser.exit(2, f"vmlease {verb}: no command given; {usage}\n")
    args.program = program
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        code: int = args.func(args)
    except VMLeaseError as exc:
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
        print(f"vmlease: error: {exc}{notes}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
