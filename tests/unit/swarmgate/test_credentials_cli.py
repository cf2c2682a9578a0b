"""`swarmgate issue`: a credential file a process of its role can load, and nothing else."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from protocol.credentials import Role
from protocol.membership import Membership, SwarmKey
from swarmgate.cli import main


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as ended:
        main(list(argv))
    return int(ended.value.code or 0) if not isinstance(ended.value.code, str) else 1


def test_issue_writes_a_credential_for_its_role(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = SwarmKey.generate()
    key.save(tmp_path / "swarm.key")
    out = tmp_path / "gw.cred"
    argv = ["issue", "--swarm-key", str(tmp_path / "swarm.key"), "--role", "gateway"]
    assert run(*argv, "--days", "7", "--name", "gw-1", str(out)) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    held = Membership.load(out, Role.GATEWAY)
    printed = capsys.readouterr().out
    assert held.credential().id in printed and "gw-1" in printed
    assert held.fingerprint == key.fingerprint
    assert 6.9 * 86400 < held.credential().not_after - out.stat().st_mtime < 7.1 * 86400

    # Never overwritten; only the swarm key issues; a credential is no swarm key.
    with pytest.raises(SystemExit, match="exists"):
        main([*argv, str(out)])
    with pytest.raises(SystemExit, match="only the swarm key itself"):
        main(["issue", "--swarm-key", str(out), "--role", "server", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--days"):
        main([*argv, "--days", "100000", str(tmp_path / "long.cred")])
