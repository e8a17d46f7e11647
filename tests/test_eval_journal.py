"""The results file of the long evals (`<stem>.jsonl`): the settings line, records appended as they come, what
--resume reads back, and the damaged files it refuses."""

from __future__ import annotations

import json

import pytest

from infinichat.errors import InfinichatError
from infinichat.eval.journal import Journal

SETTINGS = {"model": None, "seed": 0, "lengths": (400, 500)}


def test_records_append_and_read_back_on_resume(tmp_path):
    j = Journal.open(tmp_path / "out", "ruler", SETTINGS, ("policy", "sample"), resume=False)
    assert not (tmp_path / "out").exists()  # nothing written before begin (a model that fails to load)
    j.begin()
    j.append([{"policy": "full", "sample": 0, "score": 1.0}])
    j.append([{"policy": "full", "sample": 1, "score": 0.5, "refs": ("a",)}])
    lines = (tmp_path / "out" / "ruler.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["settings"] == {"model": None, "seed": 0, "lengths": [400, 500]}
    assert len(lines) == 3 and j.has("full", 1) and not j.has("full", 2)
    again = Journal.open(tmp_path / "out", "ruler", SETTINGS, ("policy", "sample"), resume=True)
    assert again.records == [{"policy": "full", "sample": 0, "score": 1.0}, j.records[1]] and again.has("full", 0)
    assert [r["sample"] for r in again.ordered([("full", 1), ("full", 0), ("h2o", 0)])] == [1, 0]
    with pytest.raises(InfinichatError, match=r"already holds 2 record\(s\) of an earlier run: add --resume"):
        Journal.open(tmp_path / "out", "ruler", SETTINGS, ("policy", "sample"), resume=False)
    with pytest.raises(
        InfinichatError, match=r"was run with seed=0, this command has seed=1; give the same settings, or another --out"
    ):
        Journal.open(tmp_path / "out", "ruler", {**SETTINGS, "seed": 1}, ("policy", "sample"), resume=True)


def test_a_cut_last_line_is_dropped_and_a_damaged_file_refused(tmp_path):
    j = Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), resume=False)
    j.append([{"policy": "full", "sample": 0}, {"policy": "full", "sample": 1}])
    path = tmp_path / "niah.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"policy": "full", "sam')
    again = Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), resume=True)
    assert len(again.records) == 2 and path.read_text() == whole  # repaired: the next record starts a line
    again.discard([("full", 1)])
    assert [r["sample"] for r in Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), True).records] == [0]
    path.write_text(whole.replace('"sample": 0}', '"sample": 0'))
    with pytest.raises(InfinichatError, match=r"niah.jsonl, line 2: not a JSON record; the file is damaged"):
        Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), resume=True)
    path.write_text('{"policy": "full"}\n')
    with pytest.raises(InfinichatError, match="line 1: not the settings line of an infinichat results file"):
        Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), resume=True)
