"""`ctriage echo`: C-ECHO from the appliance to real peers (dcmtk's storescp, the appliance's own node)."""
from __future__ import annotations

import pytest

from appliance.cli import main
from appliance.ingest.dicom_scp import DicomNode, DirectorySink

from .test_dicom_scp import free_port
from .test_pacs import StoreSCP


def _echo(capsys, *argv):
    rc = main(["echo", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_echo_dcmtk_storescp(capsys, tmp_path):
    scp = StoreSCP(tmp_path / "pacs", free_port(), aet="ARCHIVE").start()
    try:
        rc, out, err = _echo(capsys, f"ARCHIVE@127.0.0.1:{scp.port}", "--aet", "CT_ROOM_2")
    finally:
        scp.stop()
    assert rc == 0, err
    assert f"C-ECHO ARCHIVE@127.0.0.1:{scp.port} (calling AE CT_ROOM_2): success, round trip" in out
    assert " ms" in out


def test_echo_refused_port_is_one_line_exit_2(capsys):
    rc, out, err = _echo(capsys, f"PACS@127.0.0.1:{free_port()}", "--timeout", "3")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "cannot connect" in err and "refused" in err.lower()


def test_echo_rejected_by_allow_list_says_why(capsys, tmp_path):
    with DicomNode(DirectorySink(tmp_path), port=0, bind="127.0.0.1", allowed_callers=["CONSOLE"]) as node:
        rc, out, err = _echo(capsys, f"CTRIAGE@127.0.0.1:{node.port}", "--aet", "STRANGER")
        assert rc == 2
        assert len(err.strip().splitlines()) == 1
        assert "rejected" in err and "Calling AE title" in err
        rc, out, err = _echo(capsys, f"CTRIAGE@127.0.0.1:{node.port}", "--aet", "CONSOLE")
        assert rc == 0 and "success" in out and node.stats.echoes == 1


def test_echo_unknown_host(capsys):
    rc, out, err = _echo(capsys, "PACS@no-such-host.invalid:104", "--timeout", "3")
    assert rc == 2 and "unknown host no-such-host.invalid" in err


@pytest.mark.parametrize("arg", ["PACS@host", "PACS", "@host:104", "PACS@host:99999"])
def test_echo_bad_peer_argument(capsys, arg):
    rc, out, err = _echo(capsys, arg)
    assert rc == 2 and "AET@host:port" in err
