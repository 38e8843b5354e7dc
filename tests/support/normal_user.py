"""A throwaway normal user for tests: made with useradd, removed with its files.

Tests run as root (so does CI), which hides everything a normal user meets:
no ``/usr/sbin`` on PATH, no way to write root's files, ``/dev/kvm`` closed.
``NormalUser`` makes a user with a home and subordinate ids, as ``adduser``
does on Debian, and runs commands as that user with Debian's default PATH
for users and nothing else of root's environment. On leaving, the user's
processes are killed and the user, its home (subordinate ids' files
included) and its ``/etc/subuid`` lines are removed.

The user runs this checkout's vmlease with a Python of its own: the
virtualenv's interpreter when the user may run it, else the system's
``python3`` of the same version, with the checkout's ``src`` and the
virtualenv's packages on its path. Where others cannot read those (a
checkout under ``/root``), the user gets a copy of them and of the examples.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEBIAN_USER_PATH", "NormalUser", "unusable_reason"]

#: What Debian's /etc/profile and login.defs give a normal user.
DEBIAN_USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
ROOT = Path(__file__).resolve().parents[2]


def unusable_reason() -> str | None:
    """Why throwaway users cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making a throwaway user needs root"
    missing = [
        t for t in ("useradd", "userdel", "runuser") if not shutil.which(t, path=_sbin_path())
    ]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install passwd util-linux)"
    return None


def _sbin_path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _readable_by_all(path: Path) -> bool:
    """Whether every folder from / down to ``path`` lets others in."""
    for part in [path, *path.parents]:
        if part.exists() and not part.stat().st_mode & 0o001:
            return False
    return True


class NormalUser:
    """A throwaway user; use as a context manager."""

    def __init__(self) -> None:
        self.name = f"vmlt{secrets.token_hex(3)}"
        self.home = Path("/home") / self.name
        self.uid = -1
        self.gid = -1
        self.python = ""
        self.pythonpath = ""
        #: This checkout, or a copy the user can read.
        self.checkout = ROOT
        self._copy: Path | None = None

    def __enter__(self) -> NormalUser:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", self.name],
            check=True,
            env={**os.environ, "PATH": _sbin_path()},
            capture_output=True,
        )
        try:
            self.uid = int(subprocess.check_output(["id", "-u", self.name]))
            self.gid = int(subprocess.check_output(["id", "-g", self.name]))
            self._choose_python()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _choose_python(self) -> None:
        site = Path(sysconfig.get_paths()["purelib"])
        if _readable_by_all(site) and _readable_by_all(ROOT / "src"):
            self.checkout = ROOT
        else:
            # A checkout (or virtualenv) others cannot read, under /root say: the
            # user gets a copy of what it runs.
            self._copy = Path(tempfile.mkdtemp(prefix="vmlease-user-copy-"))
            self._copy.chmod(0o755)
            for part in ("src", "examples", "pyproject.toml"):
                source = ROOT / part
                if source.is_dir():
                    shutil.copytree(source, self._copy / part)
                else:
                    shutil.copy2(source, self._copy / part)
            shutil.copytree(site, self._copy / "site-packages", symlinks=True)
            self.checkout, site = self._copy, self._copy / "site-packages"
        own = os.path.realpath(sys.executable)
        system = shutil.which("python3", path="/usr/bin:/bin") or ""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        for python in (own, system):
            if not python:
                continue
            probe = self.run(
                [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                check=False,
            )
            if probe.returncode == 0 and probe.stdout.strip() == version:
                self.python = python
                break
        else:
            raise RuntimeError(f"no Python {version} this user may run (apt-get install python3)")
        self.pythonpath = f"{self.checkout / 'src'}:{site}"

    def env(self, **extra: str) -> dict[str, str]:
        """A login's environment: Debian's PATH for users, this user's home."""
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": DEBIAN_USER_PATH,
            "LANG": "C.UTF-8",
            **({"PYTHONPATH": self.pythonpath} if self.pythonpath else {}),
            **extra,
        }

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout_s: float = 600,
        cwd: Path | None = None,
        **extra_env: str,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user, with ``env()`` and nothing of root's.

        Past ``timeout_s`` the user's Python processes are asked for their
        threads' stacks (``PYTHONFAULTHANDLER``, SIGABRT) and the failure
        shows them, with the tails of the user's libvirt and QEMU logs.
        """
        env = self.env(PYTHONFAULTHANDLER="1", **extra_env)
        with subprocess.Popen(
            ["runuser", "-u", self.name, "--", "env", "-i", *_pairs(env), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd or self.home,
            env={**os.environ, "PATH": _sbin_path()},
        ) as process:
            try:
                out, err = process.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                subprocess.run(["pkill", "-ABRT", "-u", self.name, "python"], check=False)
                try:
                    out, err = process.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    out, err = process.communicate()
                raise AssertionError(
                    f"as {self.name}: {' '.join(argv)} still running after {timeout_s:.0f} s\n"
                    f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-8000:]}\n"
                    f"{self.log_tails()}"
                ) from None
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        if check and done.returncode != 0:
            raise AssertionError(
                f"as {self.name}: {' '.join(argv)} exited {done.returncode}\n"
                f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
            )
        return done

    def vmlease(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """``vmlease ARGS`` as this user."""
        return self.run([self.python, "-m", "vmlease", *args], **kw)  # type: ignore[arg-type]

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of the logs this user's libvirt and VMs wrote."""
        shown = []
        for log in sorted((self.home / ".cache/libvirt").glob("**/*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            shown.append(f"--- {log} ---\n" + "\n".join(text))
        return "\n".join(shown)

    def files_not_owned(self) -> list[Path]:
        """Files under the home that do not belong to this user (a leak of root's)."""
        found = []
        for top, dirs, files in os.walk(self.home):
            for entry in [Path(top), *(Path(top) / n for n in dirs + files)]:
                if entry.lstat().st_uid != self.uid:
                    found.append(entry)
        return found

    def __exit__(self, *_exc: object) -> None:
        env = {**os.environ, "PATH": _sbin_path()}
        subprocess.run(["pkill", "-KILL", "-u", self.name], capture_output=True, check=False)
        for _ in range(50):
            if subprocess.run(["pgrep", "-u", self.name], capture_output=True).returncode:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        # What the user's runs left in the shared temporary directory (pytest's
        # pytest-of-NAME, for one) goes with the user.
        tmp = Path(tempfile.gettempdir())
        for entry in tmp.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_uid == self.uid:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()
        subprocess.run(
            ["userdel", "--remove", "--force", self.name], capture_output=True, env=env, check=False
        )
        shutil.rmtree(self.home, ignore_errors=True)
        if self._copy is not None:
            shutil.rmtree(self._copy, ignore_errors=True)


def _pairs(env: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]
