import os
import stat

from appliance.privacy import load_secret, pseudonym


def test_pseudonym_is_stable_keyed_and_short():
    a = pseudonym(b"site-secret-1234567", "1.2.840.113619.2.55.3")
    assert a == pseudonym(b"site-secret-1234567", "1.2.840.113619.2.55.3")
    assert a != pseudonym(b"other-secret-1234567", "1.2.840.113619.2.55.3")
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    assert "113619" not in a


def test_secret_generated_once_private(tmp_path, monkeypatch):
    monkeypatch.delenv("CTRIAGE_STUDY_KEY_SECRET", raising=False)
    s1 = load_secret("", tmp_path)
    s2 = load_secret("", tmp_path)
    assert s1 == s2 and len(s1) >= 32
    mode = stat.S_IMODE(os.stat(tmp_path / "study_key.secret").st_mode)
    assert mode == 0o600


def test_secret_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRIAGE_STUDY_KEY_SECRET", "from-environment-xyz")
    assert load_secret("", tmp_path) == b"from-environment-xyz"
    f = tmp_path / "s"
    f.write_text("file-secret-0123456789\n")
    assert load_secret(str(f), tmp_path) == b"file-secret-0123456789"
