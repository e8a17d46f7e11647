"""Config files (`--config FILE`): every example config under configs/ loads for every command and runs one
step (a ChatAPI reply on a tiny model, an eval run from the CLI); typos are refused naming the key and the
accepted ones; the command line overrides the file; `device` maps onto a `--device` option where a parser has one."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

from infinichat import config_file
from infinichat.api import ChatAPI
from infinichat.cli.main import build_parser, main
from infinichat.errors import InfinichatError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
COMMANDS = ["serve", "chat", "story", "generate", "eval ppl", "eval passkey", "eval infinitebench", "bench latency"]


def _ns(path, command: str, extra=()):
    positional = ["hello"] if command == "generate" else []
    return config_file.namespace(path, command, [*positional, *extra])


def test_the_examples_exist():
    assert {p.stem for p in CONFIGS} >= {"omnikv", "snapkv", "streaming", "h2o"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_example_loads_for_every_command(path, command):
    args = _ns(path, command)
    assert args.config == str(path)
    assert args.dtype in ("float32", "bfloat16")


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "latency_sweep"], ids=lambda p: p.stem)
def test_every_example_runs_one_chat_step(path, tiny_gguf_1k, tmp_path, cli_threads):
    api = ChatAPI.from_config(path, ["--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c")])
    assert api.run.name == path.stem
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    reply = api.chat(messages, max_tokens=3, temperature=0.0)
    assert isinstance(reply, str)
    chunks = list(api.stream(messages, max_tokens=3, temperature=0.0))
    assert "".join(chunks) == reply  # greedy: the same tokens both ways


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_example_runs_one_eval_step(path, tiny_gguf_1k, tmp_path, capsys, cli_threads):
    out = tmp_path / "out"
    args = ["eval", "passkey", "--config", str(path), "--lengths", "320", "--depths", "0.5", "--samples", "1"]
    args += ["--max-new-tokens", "2", "--out", str(out), "--model", str(tiny_gguf_1k), "--threads", "1"]
    rc = main([*args, "--cache-dir", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "passkey.json").read_text())
    names = config_file.load(path, build_parser()).policy.names
    assert [p["policy"] for p in report["policies"]] == names
    assert report["max_new_tokens"] == 2  # the command line over the file's [eval] max_new_tokens


def _write(tmp_path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, command, pattern",
    [
        ("dtipe = 'float32'\n", "chat", r"unknown key 'dtipe'; accepted: .*dtype"),
        (
            "[sampling]\ntempreature = 0.5\n",
            "chat",
            r"unknown key 'tempreature' in \[sampling\]; accepted: .*temperature",
        ),
        ("[policy]\nbudgt = 5\n", "chat", r"unknown key 'budgt' in \[policy\]; accepted: name, budget"),
        ("[eval.passkey]\nlenghts = [1]\n", "eval passkey", r"unknown key 'lenghts' in \[eval.passkey\]; .*lengths"),
        ("[chat]\nport = 1\n", "chat", r"unknown key 'port' in \[chat\]; accepted: .*ctx"),
        ("[eval]\nport = 1\n", "eval ppl", r"unknown key 'port' in \[eval\]; accepted: .*eval.passkey"),
        ("threads = 'two'\n", "chat", r"threads must be an integer, got 'two'"),
        ("[serve]\nmax_header_kb = [64]\n", "serve", r"max_header_kb must be an integer, got \[64\]"),  # was: '64'
        ("[serve]\nmax_header_kb = true\n", "serve", r"max_header_kb must be an integer, got true"),  # was: "a int"
        ("[serve]\nprefill_group = 1.5\n", "serve", r"prefill_group must be an integer, got 1.5"),
        ("[sampling]\ntemperature = [1]\n", "chat", r"temperature must be a number, got \[1\]"),
        ("[sampling]\ntemperature = 'hot'\n", "chat", r"temperature must be a number"),
        ("dtype = 'float64'\n", "chat", r"dtype = 'float64' is not one of float32, bfloat16, float16"),
        ("[eval.passkey]\nno_chat_template = 1\n", "eval passkey", r"no_chat_template must be true or false"),
        ("x = [\n", "chat", r"is not valid TOML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, text, command, pattern):
    with pytest.raises(InfinichatError, match=pattern):
        _ns(_write(tmp_path, text), command)


def test_cli_reports_a_typo_as_an_error(tmp_path, capsys):
    assert main(["chat", "--config", str(_write(tmp_path, "[sampling]\ntop_kk = 3\n"))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'top_kk' in [sampling]" in err and "top_k" in err
    assert main(["chat", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read --config" in capsys.readouterr().err


def test_command_line_overrides_the_file(tmp_path):
    p = _write(
        tmp_path,
        "dtype = 'float32'\nthreads = 3\n[policy]\nname = 'snapkv'\nbudget_frac = 0.25\nbudget = 900\n"
        "params = { window = 16 }\n[sampling]\ntemperature = 0.2\nstop = ['END']\n[eval]\nseed = 7\n"
        "[eval.passkey]\nlengths = [512, 1024]\nseed = 9\n",
    )
    a = _ns(p, "eval passkey")
    assert (a.dtype, a.threads, a.policies, a.lengths, a.seed) == ("float32", 3, "snapkv", "512,1024", 9)
    assert (a.budget, a.budget_frac, a.param) == (None, "0.25", ["snapkv.window=16"])  # eval takes the fraction
    a = _ns(p, "eval passkey", ["--threads", "1", "--lengths", "256", "--budget", "128", "--seed", "0"])
    assert (a.threads, a.lengths, a.budget, a.budget_frac, a.seed) == (1, "256", "128", None, 0)
    assert _ns(p, "eval niah").seed == 7  # [eval] for every eval command
    c = _ns(p, "chat", ["--temperature", "0.9"])
    assert (c.temperature, c.stop, c.ctx, c.policy) == (0.9, ["END"], 900, "snapkv")
    b = _ns(p, "bench latency")
    assert (b.budget, b.budget_frac, b.policies) == (900, "snapkv=0.25", "snapkv")


def test_device_maps_onto_a_device_option_where_the_parser_has_one(tmp_path):
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run")
    run.add_argument("--device", default="cpu")
    run.add_argument("--threads", type=int, default=0)
    run.add_argument("--config")
    p = _write(tmp_path, "device = 'cuda:0'\nthreads = 2\n")
    args = config_file.parse_args(parser, ["run", "--config", str(p)])
    assert (args.device, args.threads) == ("cuda:0", 2)
    assert config_file.parse_args(parser, ["run", "--config", str(p), "--device", "cpu"]).device == "cpu"


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="PyYAML is not installed")
def test_yaml_files(tmp_path):
    p = _write(tmp_path, "dtype: float32\npolicy:\n  name: streaming\n  budget: 512\n", "c.yaml")
    a = _ns(p, "chat")
    assert (a.dtype, a.policy, a.ctx) == ("float32", "streaming", 512)
    with pytest.raises(InfinichatError, match=re.escape("unknown key 'dtyp'")):
        _ns(_write(tmp_path, "dtyp: float32\n", "d.yaml"), "chat")


def test_list_parameters_reach_the_policy(tmp_path):
    from infinichat.eval.runner import policy_params

    p = _write(tmp_path, "[policy]\nname = 'omnikv'\nparams = { filter_layers = [2, 14, 24], offload = false }\n")
    a = _ns(p, "eval passkey")
    assert a.param == ["omnikv.filter_layers=2,14,24", "omnikv.offload=false"]
    assert policy_params(["omnikv"], a.param) == {"omnikv": {"filter_layers": (2, 14, 24), "offload": False}}
