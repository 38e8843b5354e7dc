"""The cloud-init NoCloud seed vmlease gives an imported image on its first boot.

The seed is an ISO 9660 disk labelled ``cidata`` holding ``meta-data``
(instance id, hostname) and ``user-data``: a cloud-config that makes the SSH
user (key only, passwordless sudo, no password anywhere), installs the vmlease
agent as a service of the guest's init (systemd's unit, or an OpenRC script on
Alpine) and starts it. A user's own ``--user-data`` file
is a second part of a MIME multipart message, merged so that its lists add
to vmlease's (``runcmd``, ``write_files``, ``packages``) instead of
replacing them.
"""

from __future__ import annotations

import base64
import gzip
import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from vmlease._errors import ImageImportError
from vmlease._runner import Runner, find_program
from vmlease._spec import USER_RULE
from vmlease.backends.guest.images._steps import Steps

__all__ = ["USER_RULE", "check_user", "check_user_data", "meta_data", "user_data", "write_seed"]

AGENT_PATH = "/usr/sbin/vmlease-agent"
UNIT_PATH = "/etc/systemd/system/vmlease-agent.service"
#: Where the OpenRC script waits: installed in /etc/init.d only under OpenRC, since
#: systemd would take a script there for a SysV service of the same name.
OPENRC_PATH = "/usr/lib/vmlease/openrc-vmlease-agent"
#: Enables and starts the agent under the init that runs; gives the user a shell
#: the guest has (Alpine has no bash).
_START = (
    "if [ -d /run/systemd/system ]; then systemctl daemon-reload && "
    "systemctl enable --now vmlease-agent.service; "
    "elif command -v rc-update >/dev/null; then "
    f"install -m 0755 {OPENRC_PATH} /etc/init.d/vmlease-agent && "
    "rc-update add vmlease-agent default && "
    "rc-service vmlease-agent start; "
    'else echo "vmlease: no systemd or OpenRC to run the agent" >&2; exit 1; fi'
)
#: A user-data file's first line, and the MIME type cloud-init knows it by.
_KINDS = {
    "#cloud-config": "cloud-config",
    "#!": "x-shellscript",
    "#cloud-boothook": "cloud-boothook",
    "#include": "x-include-url",
}
#: Lists in the user's cloud-config add to vmlease's instead of replacing them.
_MERGE = "list(append)+dict(recurse_array,no_replace)+str()"
#: ISO makers, with the arguments that make them behave like genisoimage.
_ISO_TOOLS: tuple[tuple[str, list[str]], ...] = (
    ("genisoimage", []),
    ("xorriso", ["-as", "mkisofs"]),
)


def check_user(user: str) -> str:
    """``user`` if it is a valid user name; ImageImportError otherwise."""
    if not USER_RULE.fullmatch(user):
        raise ImageImportError(
            f"{user!r} is not a user name a guest can have: use lower-case letters, "
            "digits, '_' and '-', starting with a letter or '_', at most 32 characters"
        )
    return user


def check_user_data(data: bytes, shown: str) -> str:
    """The cloud-init part type of a user-data file; ImageImportError if it has none."""
    try:
        first = data.decode().splitlines()[0].strip() if data.strip() else ""
    except UnicodeDecodeError:
        first = ""
    for prefix, kind in _KINDS.items():
        if first.startswith(prefix):
            return kind
    raise ImageImportError(
        f"{shown} is not user-data cloud-init reads: its first line must be "
        "'#cloud-config' (or '#!' for a script, '#cloud-boothook', '#include')"
    )


def meta_data(instance_id: str, hostname: str) -> bytes:
    return json.dumps({"instance-id": instance_id, "local-hostname": hostname}).encode() + b"\n"


def _config(
    hostname: str, user: str, public_key: str, agent: bytes, unit: bytes, openrc: bytes
) -> str:
    keys = [public_key] if public_key else []
    account: dict[str, object] = {
        "name": user,
        "lock_passwd": True,
        "shell": "/bin/bash",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "ssh_authorized_keys": keys,
    }
    runcmd = [["sh", "-c", _START]]
    if user != "root":
        shell = (
            f"[ -x /bin/bash ] || sed -i 's|^\\({user}:.*:\\)/bin/bash$|\\1/bin/sh|' /etc/passwd"
        )
        runcmd.insert(0, ["sh", "-c", shell])
    config: dict[str, object] = {
        "hostname": hostname,
        "users": [] if user == "root" else [account],
        "disable_root": user != "root",
        "ssh_pwauth": False,
        "write_files": [
            {
                "path": AGENT_PATH,
                "permissions": "0755",
                "encoding": "gz+b64",
                "content": base64.b64encode(gzip.compress(agent, mtime=0)).decode(),
            },
            {"path": UNIT_PATH, "permissions": "0644", "content": unit.decode()},
            *(
                [{"path": OPENRC_PATH, "permissions": "0755", "content": openrc.decode()}]
                if openrc
                else []
            ),
        ],
        "runcmd": runcmd,
    }
    if user == "root":
        config["ssh_authorized_keys"] = keys
    # JSON is YAML: no YAML writer needed, and nothing in it is read ambiguously.
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def user_data(
    *,
    hostname: str,
    user: str,
    public_key: str,
    agent: bytes,
    unit: bytes,
    openrc: bytes = b"",
    extra: bytes | None = None,
    extra_kind: str = "cloud-config",
) -> bytes:
    """The seed's user-data: vmlease's cloud-config, then the user's part, if any.
    ``unit`` runs the agent under systemd, ``openrc`` under OpenRC."""
    ours = _config(hostname, user, public_key, agent, unit, openrc)
    if extra is None:
        return ours.encode()
    message = MIMEMultipart(boundary="==vmlease-seed==")
    message.attach(MIMEText(ours, "cloud-config", "utf-8"))
    theirs = MIMEText(extra.decode(), extra_kind, "utf-8")
    theirs["Merge-Type"] = _MERGE
    message.attach(theirs)
    return message.as_bytes()


def write_seed(out: Path, files: dict[str, bytes], runner: Runner, work: Path) -> None:
    """Write the ISO 9660 seed ``out`` (volume ``cidata``) holding ``files``."""
    tool = next(((find_program(t), extra) for t, extra in _ISO_TOOLS if find_program(t)), None)
    if tool is None or tool[0] is None:
        raise ImageImportError(
            "making the cloud-init seed needs genisoimage or xorriso: apt-get install genisoimage"
        )
    folder = work / "seed"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    Steps(runner, lambda _line: None).check(
        [
            tool[0],
            *tool[1],
            "-quiet",
            "-output",
            str(out),
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
            *(str(folder / name) for name in files),
        ],
        "making the cloud-init seed",
        60,
    )
