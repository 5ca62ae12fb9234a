"""appliance.oneshot: finding the files of a study folder (analyze, evaluate)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.cli import main
from appliance.oneshot import discover, walk_files


def test_linked_series_folders_are_followed_once_and_a_link_loop_ends(tmp_path):
    data = tmp_path / "data"
    (data / "s1").mkdir(parents=True)
    (data / "s1" / "a.dcm").write_bytes(b"x")
    (data / "s1" / "b.png").write_bytes(b"x")
    study = tmp_path / "study"
    (study / "own").mkdir(parents=True)
    (study / "own" / "c.dcm").write_bytes(b"x")
    (study / ".hidden").write_bytes(b"x")
    (study / "linked").symlink_to(data / "s1", target_is_directory=True)
    (study / "again").symlink_to(data / "s1", target_is_directory=True)  # the same real folder: once
    (study / "own" / "loop").symlink_to(study, target_is_directory=True)
    (study / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    broken: list[Path] = []
    files = walk_files(study, broken)
    names = sorted(p.name for p in files)
    assert names == ["a.dcm", "b.png", "c.dcm"]
    assert broken == [study / "gone.dcm"]
    others, images = discover(study)
    assert sorted(p.name for p in others) == ["a.dcm", "c.dcm"]
    assert [sorted(p.name for p in v) for v in images.values()] == [["b.png"]]


def test_analyze_reads_a_study_folder_made_of_links_to_series(phantom_dir, tmp_path, capsys):
    """A study assembled from a symbolic link to its series folder is analysed, not reported as empty."""
    study = tmp_path / "study"
    study.mkdir()
    os.symlink(phantom_dir, study / "series-1", target_is_directory=True)
    code = main(["analyze", str(study), "--json"])
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0 and len(objs) == 1 and objs[0]["slices"] == 24
