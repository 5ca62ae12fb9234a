"""The AE title rule and the AET@host:port address (appliance/dicom_names.py), used by the config, the DICOM node,
the PACS sender, `ctriage echo` and `ctriage run --dicom-aet`."""
import pytest

from appliance.dicom_names import is_ae_title, parse_peer


@pytest.mark.parametrize("text,ok", [("CTRIAGE", True), ("A" * 16, True), (" CT_AI ", True), ("*", True),
                                     ("A" * 17, False), ("", False), ("    ", False), ("CT\\AI", False),
                                     ("CT\tAI", False), ("CT\x00", False)])
def test_ae_title(text, ok):
    assert is_ae_title(text) is ok


def test_peer():
    assert parse_peer(" PACS@10.0.0.5:104 ") == ("PACS", "10.0.0.5", 104)
    assert parse_peer("ARCH@[::1]:11112") == ("ARCH", "::1", 11112)
    for bad in ("PACS@host", "@host:104", "   @host:104", "A" * 17 + "@host:104", "PACS@host:0", "PACS@host:70000",
                "PA\\CS@host:104", "PACS@ho st:104"):
        assert parse_peer(bad) is None, bad


def test_every_user_of_the_rule_agrees():
    from appliance.ingest.dicom_scp import Caller, DicomNode
    from appliance.publish.dicom_peer import Destination

    for bad in ("A" * 17, "CT\\AI"):
        with pytest.raises(ValueError, match="1-16"):
            Destination.parse(f"{bad}@host:104")
        with pytest.raises(ValueError, match="1-16"):
            Caller.parse(bad)
        with pytest.raises(ValueError, match="1 to 16"):
            DicomNode(None, ae_title=bad)  # type: ignore[arg-type]
