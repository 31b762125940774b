"""git and DVC helpers: read revisions and hashes, commit stages, tag rounds, push.

Every call shells out to ``git`` or ``dvc`` (DVC through ``python -m dvc`` of this
interpreter, so the venv's DVC is used) and turns a failure into a :class:`VersioningError`
that names the command, the folder and the tool's last error line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from vlp_core.errors import VlpError


class VersioningError(VlpError, RuntimeError):
    """A git or dvc command failed (names the command and the folder)."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    return env


def _run(cmd: Sequence[str], cwd: str | Path, what: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), cwd=str(cwd), capture_output=True, text=True, env=_env())
    except FileNotFoundError:
        raise VersioningError(f"{what}: command {cmd[0]!r} not found (is it installed?)") from None
    if check and proc.returncode != 0:
        err = [ln.strip() for ln in (proc.stderr.strip() or proc.stdout.strip()).splitlines() if ln.strip()]
        tail = " / ".join(err[-3:]) if err else f"exit code {proc.returncode}"
        raise VersioningError(f"{what} failed in {cwd}: `{' '.join(cmd)}`: {tail}")
    return proc


def git(args: Sequence[str], cwd: str | Path = ".", check: bool = True) -> subprocess.CompletedProcess:
    return _run(["git", *args], cwd, f"git {args[0] if args else ''}".strip(), check)


def dvc(args: Sequence[str], cwd: str | Path = ".", check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, f"dvc {args[0] if args else ''}".strip(), check)


# --------------------------------------------------------------------------- reading
def is_git_repo(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and git(["rev-parse", "--is-inside-work-tree"], p, check=False).returncode == 0


def is_dvc_repo(path: str | Path) -> bool:
    return (Path(path) / ".dvc").is_dir()


def git_rev(path: str | Path) -> Optional[str]:
    """HEAD's commit id (with ``+dirty`` when tracked files changed), or None outside git."""
    if not is_git_repo(path):
        return None
    proc = git(["rev-parse", "HEAD"], path, check=False)
    if proc.returncode != 0:
        return None  # no commit yet
    rev = proc.stdout.strip()
    dirty = git(["status", "--porcelain", "--untracked-files=no"], path, check=False).stdout.strip()
    return f"{rev}+dirty" if dirty else rev


def dvc_lock_hashes(path: str | Path) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` from ``dvc.lock`` (empty when there is none)."""
    lock = Path(path) / "dvc.lock"
    if not lock.exists():
        return {}
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VersioningError(f"{lock}: not valid YAML ({exc})") from None
    out: dict[str, dict[str, str]] = {}
    for stage, body in (data.get("stages") or {}).items():
        outs = {o.get("path"): o.get("md5") for o in (body or {}).get("outs", []) if isinstance(o, dict)}
        if outs:
            out[stage] = outs
    return out


def dvc_stage_names(path: str | Path) -> list[str]:
    """Every stage name of the pipeline (``foreach`` stages expanded, e.g. ``ingest@web``)."""
    proc = dvc(["stage", "list", "--name-only"], path)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def dvc_status(path: str | Path, targets: Sequence[str] = ()) -> dict[str, Any]:
    """``dvc status --json`` as a dict: empty means every stage is up to date."""
    proc = dvc(["status", "--json", *targets], path)
    text = proc.stdout.strip()
    return json.loads(text) if text else {}


# --------------------------------------------------------------------------- writing
def dvc_commit(path: str | Path, stages: Sequence[str]) -> None:
    """Record stages that ran outside ``dvc repro`` (e.g. in a Prefect task) in ``dvc.lock``
    and the DVC cache, so that ``dvc status`` is clean afterwards."""
    if stages:
        dvc(["commit", "--force", *stages], path)


def git_commit_and_tag(path: str | Path, message: str, tag: Optional[str] = None,
                       paths: Sequence[str] = ("dvc.lock",), force: Sequence[str] = ()) -> Optional[str]:
    """Commit ``paths`` and ``force`` (the ones that exist; ``force`` added even where a
    ``.gitignore`` hides them: DVC's ``cache: false`` metrics and plots, which git must hold) and
    tag the commit; returns the commit id.  An existing tag is moved (``-f``) so that re-running a
    round re-tags it."""
    existing = [p for p in paths if (Path(path) / p).exists()]
    forced = [str(p) for p in force if (Path(path) / p).exists()]
    if forced:
        git(["add", "-f", "--", *forced], path)
    if existing:
        git(["add", "--", *existing], path)  # not -f: a path the user ignores on purpose stays out
    both = existing + forced
    if both:
        staged = git(["diff", "--cached", "--quiet", "--", *both], path, check=False).returncode != 0
        if staged:
            git(["-c", "user.name=vlp", "-c", "user.email=vlp@localhost", "commit", "-q", "-m", message,
                 "--", *both], path)
    rev = git(["rev-parse", "HEAD"], path).stdout.strip()
    if tag:
        git(["tag", "-f", tag], path)
    return rev


def dvc_push(path: str | Path, remote: Optional[str] = None, targets: Sequence[str] = ()) -> None:
    """Push the cache of ``targets`` (default: everything) to ``remote`` (default remote)."""
    dvc(["push", *(["-r", remote] if remote else []), *targets], path)


def ensure_local_remote(path: str | Path, remote_dir: str | Path, name: str = "local") -> None:
    """Add (once) a local-directory DVC remote and make it the default."""
    remotes = dvc(["remote", "list"], path).stdout
    if not any(line.split()[:1] == [name] for line in remotes.splitlines()):
        Path(remote_dir).mkdir(parents=True, exist_ok=True)
        dvc(["remote", "add", "-d", name, str(remote_dir)], path)


__all__ = [
    "VersioningError", "dvc", "dvc_commit", "dvc_lock_hashes", "dvc_push", "dvc_stage_names", "dvc_status",
    "ensure_local_remote", "git", "git_commit_and_tag", "git_rev", "is_dvc_repo", "is_git_repo",
]
