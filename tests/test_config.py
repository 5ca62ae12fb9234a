import pytest

from appliance.config import ConfigError, from_dict, load, to_toml


def test_defaults_are_valid():
    cfg = from_dict({})
    assert cfg.analysis.min_run == 3 and cfg.analysis.min_slices == 20 and cfg.mqtt.qos == 1


@pytest.mark.parametrize("data,msg", [
    ({"mqtt": {"qos": 5}}, "[mqtt] qos: must be between 0 and 2"),
    ({"mqtt": {"url": "http://x"}}, "[mqtt] url: must start with mqtt://"),
    ({"analysis": {"backend": "tensorrt"}}, "[analysis] backend: must be one of"),
    ({"analysis": {"min_run": "3"}}, "[analysis] min_run: expected an integer, got '3'"),
    ({"mqtt": {"prot": 1}}, "unknown key 'prot'"),
    ({"device_id": "room 2/a"}, "device_id: letters, digits"),
    ({"watch": {"stable_seconds": True}}, "expected a number"),
    ({"dicom": {"ae_title": "A" * 17}}, "[dicom] ae_title"),
    ({"analysis": {"noise_target": -1}}, "[analysis] noise_target: must be between 0.001 and 0.2"),
    ({"analysis": {"noise_limit": "high"}}, "[analysis] noise_limit: expected a number, got 'high'"),
    ({"analysis": {"denoise": "yes"}}, "[analysis] denoise: expected true or false, got 'yes'"),
])
def test_errors_name_the_key(data, msg):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert msg in str(e.value)


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(ConfigError, match="did you mean 'quiet_seconds'"):
        from_dict({"series": {"quiet_second": 3}})


def test_toml_round_trip(tmp_path):
    cfg = from_dict({"device_id": "ct-2", "mqtt": {"url": "mqtts://broker:8883"}, "analysis": {"threads": 2}})
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    again = load(p)
    assert again == cfg


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[mqtt\nurl=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(tmp_path / "bad.toml")


def test_config_command_check_and_show(tmp_path, capsys):
    from appliance.cli import main

    good = tmp_path / "good.toml"
    good.write_text('device_id = "ct-9"\n[mqtt]\nqos = 1\n')
    assert main(["config", "--config", str(good), "--check"]) == 0
    assert main(["config", "--config", str(good)]) == 0
    assert 'device_id = "ct-9"' in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nqos = 7\n")
    assert main(["config", "--config", str(bad), "--check"]) == 2
    assert "[mqtt] qos" in capsys.readouterr().err


def test_with_overrides_returns_a_checked_copy():
    cfg = from_dict({})
    new = cfg.with_overrides({"watch.dir": "/srv/ct", "series.quiet_seconds": 2, "device_id": "ct-2"})
    assert (new.watch.dir, new.series.quiet_seconds, new.device_id) == ("/srv/ct", 2.0, "ct-2")
    assert cfg.watch.dir == "" and cfg.device_id == "ct-room-1"  # the original is untouched
    for overrides, msg in [({"series.quiet_seconds": 0}, "[series] quiet_seconds: must be between 0.1 and 3600"),
                           ({"series.partial_quiet_seconds": -1},
                            "[series] partial_quiet_seconds: must be between 0 and 3600"),
                           ({"mqtt.url": "http://x"}, "[mqtt] url: must start with mqtt://"),
                           ({"device_id": "a/b"}, "device_id: letters, digits"),
                           ({"watch.dirr": "/x"}, "unknown key 'watch.dirr'"),
                           ({"dicom.port": "104"}, "[dicom] port: expected an integer")]:
        with pytest.raises(ConfigError) as e:
            cfg.with_overrides(overrides)
        assert msg in str(e.value)


@pytest.mark.parametrize("data,msg", [
    ({"dicom": {"ae_title": "CT\\AI"}}, "[dicom] ae_title"),
    ({"dicom": {"ae_title": "    "}}, "[dicom] ae_title"),
    ({"dicom": {"allowed_callers": ["A" * 17]}}, "[dicom] allowed_callers[0]"),
    ({"pacs": {"destinations": ["PA\tCS@host:104"]}}, "[pacs] destinations[0]"),
    ({"pacs": {"calling_ae_title": "A" * 17}}, "[pacs] calling_ae_title"),
])
def test_one_ae_title_rule(data, msg):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert msg in str(e.value)
