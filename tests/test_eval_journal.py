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
    assert len(again.records) == 2 and path.read_text().endswith("sam")  # nothing changed before the run begins
    again.begin()
    assert path.read_text() == whole  # repaired: the next record starts a line
    again.discard([("full", 1)])
    assert [r["sample"] for r in Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), True).records] == [0]
    path.write_text(whole.replace('"sample": 0}', '"sample": 0'))
    with pytest.raises(InfinichatError, match=r"niah.jsonl, line 2: not a JSON record; the file is damaged"):
        Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), resume=True)
    path.write_text('{"policy": "full"}\n')
    with pytest.raises(InfinichatError, match="line 1: not the settings line of an infinichat results file"):
        Journal.open(tmp_path, "niah", SETTINGS, ("policy", "sample"), resume=True)


def test_a_refused_open_changes_nothing(tmp_path):
    """Without --resume, a file of an earlier run with a cut last line is refused and left exactly as it was."""
    j = Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=False)
    j.append([{"policy": "full", "sample": 0}])
    path = tmp_path / "ruler.jsonl"
    damaged = path.read_text() + '{"policy": "full", "sa'
    path.write_text(damaged)
    with pytest.raises(InfinichatError, match="already holds 1 record"):
        Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=False)
    assert path.read_text() == damaged


@pytest.mark.parametrize(
    "text",
    ["", '{"journal": 1, "task": "ruler", "sett'],  # empty; only a cut settings line
)
def test_an_empty_or_headless_file_starts_a_new_run(tmp_path, text):
    (tmp_path / "ruler.jsonl").write_text(text)
    j = Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=True)
    j.append([{"policy": "full", "sample": 0}])
    lines = (tmp_path / "ruler.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["task"] == "ruler"


FIELDS = {"policy": str, "score": (int, float), "correct": bool}


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"sample": 0, "score": 1.0, "correct": True}, r"line 2: a record without its 'policy'"),
        ({"policy": "full", "sample": 0, "correct": True}, r"line 2: 'score' is missing, a record holds int or float"),
        ({"policy": "full", "sample": 0, "score": "1", "correct": True}, r"'score' is \"1\", a record holds int or"),
        ({"policy": "full", "sample": 0, "score": True, "correct": True}, r"'score' is true, a record holds int or"),
        ({"policy": "full", "sample": 0, "score": 1, "correct": 1}, r"'correct' is 1, a record holds bool there"),
        ({"policy": 3, "sample": 0, "score": 1, "correct": True}, r"'policy' is 3, a record holds str there"),
        ({"policy": "full", "sample": 0, "score": float("nan"), "correct": True}, r"'score' is NaN"),
    ],
)
def test_records_of_the_wrong_shape_are_refused_by_line_and_field(tmp_path, record, error):
    """The reports read these fields: a record without them, or of other types, is one clear error, not a
    traceback (KeyError, TypeError) hours later; the file is left as it was."""
    j = Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=False)
    j.append([record])
    before = (tmp_path / "ruler.jsonl").read_bytes()
    with pytest.raises(InfinichatError, match=error):
        Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=True, fields=FIELDS)
    assert (tmp_path / "ruler.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("head", "error"),
    [
        ({"journal": 1, "task": "passkey", "settings": {}}, r'line 1: the results of "passkey" \(file version 1'),
        ({"journal": 2, "task": "ruler", "settings": {}}, r"file version 2\), not of ruler \(version 1\)"),
        ({"journal": 1, "task": "ruler", "settings": [1, 2]}, "line 1: not the settings line"),
        ({"journal": 1, "task": "ruler"}, "line 1: not the settings line"),
    ],
)
def test_a_settings_line_of_another_eval_or_version_is_refused(tmp_path, head, error):
    (tmp_path / "ruler.jsonl").write_text(json.dumps(head) + "\n")
    with pytest.raises(InfinichatError, match=error):
        Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=True)


def test_out_that_is_a_file_or_unwritable_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InfinichatError, match=r"--out .*f is a file; give a folder"):
        Journal.open(tmp_path / "f", "ruler", SETTINGS, ("policy",), resume=False)
    with pytest.raises(InfinichatError, match=r"--out .*f/sub: .*f is a file, not a folder"):
        Journal.open(tmp_path / "f" / "sub", "ruler", SETTINGS, ("policy",), resume=False)
    monkeypatch.setattr("os.access", lambda p, mode: False)  # (root may write anywhere: the check is mocked)
    with pytest.raises(InfinichatError, match=r"cannot write into .* \(permission denied\); give another folder"):
        Journal.open(tmp_path / "new", "ruler", SETTINGS, ("policy",), resume=False)
    assert not (tmp_path / "new").exists()


def test_a_second_process_writing_into_the_same_folder_is_refused(tmp_path):
    """Two runs resuming one folder at once would write every record twice and overwrite each other's tables: the
    second is refused while the first runs, and gets the folder once the first process has ended (killed too)."""
    import subprocess
    import sys

    Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=False).append(
        [{"policy": "full", "sample": 0}]
    )
    code = (
        "import sys, time; from pathlib import Path; from infinichat.eval.journal import Journal\n"
        f"j = Journal.open(Path({str(tmp_path)!r}), 'ruler', {SETTINGS!r}, ('policy', 'sample'), resume=True)\n"
        "j.begin(); print('ready', flush=True); time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        with pytest.raises(InfinichatError, match=r"another run is writing into .* now \(it holds .*\.ruler\.lock\)"):
            Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=True)
    finally:
        other.kill()
        other.wait()
    again = Journal.open(tmp_path, "ruler", SETTINGS, ("policy", "sample"), resume=True)
    assert again.has("full", 0)


def test_a_run_started_in_the_same_folder_while_this_one_loaded_is_not_overwritten(tmp_path):
    j = Journal.open(tmp_path / "out", "ruler", SETTINGS, ("policy", "sample"), resume=False)
    other = Journal.open(tmp_path / "out", "ruler", SETTINGS, ("policy", "sample"), resume=False)
    other.append([{"policy": "full", "sample": 0}])
    other.close()
    before = (tmp_path / "out" / "ruler.jsonl").read_text()
    with pytest.raises(InfinichatError, match=r"now holds 1 record\(s\) of another run, started there while"):
        j.begin()
    assert (tmp_path / "out" / "ruler.jsonl").read_text() == before


def test_a_discard_after_a_cut_line_keeps_the_file_whole(tmp_path):
    """multiturn's order on --resume: open (a cut last line found), discard an incomplete conversation (the file
    rewritten), begin (where the cut line would be cut): the file is the settings line and the records kept."""
    j = Journal.open(tmp_path, "multiturn", SETTINGS, ("policy", "sample"), resume=False)
    j.append([{"policy": "full", "sample": 0, "turn": 1}, {"policy": "full", "sample": 1, "turn": 1}])
    path = tmp_path / "multiturn.jsonl"
    head = path.read_text().splitlines()[0]
    path.write_text(path.read_text() + '{"policy": "full", "sample": 1, "tu')
    again = Journal.open(tmp_path, "multiturn", SETTINGS, ("policy", "sample"), resume=True)
    again.discard([("full", 1)])
    again.begin()
    again.append([{"policy": "full", "sample": 1, "turn": 1}])
    lines = path.read_text().splitlines()
    assert lines[0] == head and [json.loads(x)["sample"] for x in lines[1:]] == [0, 1]
