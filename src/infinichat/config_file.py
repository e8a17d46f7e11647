"""Config files (`--config FILE`, TOML, or YAML where PyYAML is installed) for every command, mapped onto the
command's own argparse options, so that what the command line gives overrides the file.

A file's layout (every part optional):

    model = "path/to/model.gguf"     # shared keys: options of the commands (model, dtype, quant, threads,
    dtype = "float32"                # ctx, cache_dir, device, ...), applied where the command has them
    [policy]                         # the KV policy: name (or a list), budget, budget_frac, n_sink, params
    name = "omnikv"
    budget = 2048
    params = { filter_layers = [2, 14, 24] }
    [sampling]                       # sampling defaults: temperature, top_k, top_p, max_tokens, ...
    temperature = 0.0
    [eval]                           # one command (group)'s own keys: [serve], [chat], [eval], [eval.passkey],
    lengths = [2048, 4096]           # [bench.latency], ...; checked against that command's options

Keys take an option's name with `_` or `-` (`top_k`, `top-k`). A key that no command accepts (a typo) is an
error naming it and the accepted keys; in a command's own section, a key that command does not accept is one
too. Shared keys and the `policy` / `sampling` sections apply to the commands that have the option, so one
file serves `serve`, `chat`, `eval *` and `bench latency` alike. Order of precedence: shared keys, then
`policy` / `sampling`, then the command group's section, then the command's, then the command line.
`device` maps onto a `--device` option where the command has one (looked up from the parser); where none has,
only "cpu" is accepted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinichat.errors import InfinichatError

POLICY_KEYS = ("name", "budget", "budget_frac", "n_sink", "params")
SKIP_DESTS = frozenset({"help", "config", "version", "verbose"})
# where each `policy` key goes, the first option the command has (dests)
POLICY_TARGETS: dict[str, tuple[str, ...]] = {
    "name": ("policies", "policy"),
    "budget": ("budget", "ctx"),
    "budget_frac": ("budget_frac",),
    "n_sink": ("n_sink", "sinks"),
    "params": ("param",),
}


@dataclass
class PolicySection:
    names: list[str] = field(default_factory=list)
    budget: int | None = None
    budget_frac: float | None = None
    n_sink: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConfigFile:
    path: str
    shared: dict[str, Any]
    policy: PolicySection
    sampling: dict[str, Any]
    sections: dict[str, dict[str, Any]]  # "chat", "eval", "eval.passkey", "bench.latency" -> keys


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InfinichatError(f"cannot read --config {path}: {e.strerror or e}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        if importlib.util.find_spec("yaml") is None:
            raise InfinichatError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or write it as .toml")
        import yaml  # type: ignore[import-untyped]

        try:
            obj = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise InfinichatError(f"--config {path} is not valid YAML: {e}") from None
        obj = {} if obj is None else obj
    else:
        try:
            obj = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InfinichatError(f"--config {path} is not valid TOML: {e}") from None
    if not isinstance(obj, dict):
        raise InfinichatError(f"--config {path}: expected a table of keys at the top, got {type(obj).__name__}")
    return obj


def _key(k: Any) -> str:
    return str(k).strip().replace("-", "_")


# ------------------------------------------------------------------------------------------------- parsers


def leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command of `parser` that takes no further subcommand: "chat", "eval passkey", "bench latency"."""
    out: dict[str, argparse.ArgumentParser] = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix.strip(): parser} if prefix else {}
    for action in subs:
        for name, sub in action.choices.items():
            out.update(leaf_parsers(sub, f"{prefix} {name}"))
    return out


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The command's optional arguments by dest (help, --config and the like left out)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in SKIP_DESTS}


def command_of(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[str, argparse.ArgumentParser] | None:
    """The leaf command that `argv` names, e.g. ("eval passkey", its parser); None if it names none."""
    names: list[str] = []
    current = parser
    for token in argv:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if token in subs[0].choices:
            names.append(token)
            current = subs[0].choices[token]
    if not names or any(isinstance(a, argparse._SubParsersAction) for a in current._actions):
        return None
    return " ".join(names), current


# ------------------------------------------------------------------------------------------------- loading


def load(path: str | Path, parser: argparse.ArgumentParser) -> ConfigFile:
    """Read and check a config file against every command of `parser` (keys no command accepts are errors)."""
    raw = _read(path)
    leaves = leaf_parsers(parser)
    every = {d for p in leaves.values() for d in option_actions(p)}
    groups = sorted({name.split()[0] for name in leaves} | set(leaves))
    shared: dict[str, Any] = {}
    policy = PolicySection()
    sampling: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    where = f"--config {path}"

    def unknown(key: str, place: str, accepted: Sequence[str]) -> InfinichatError:
        return InfinichatError(f"{where}: unknown key {key!r}{place}; accepted: {', '.join(sorted(accepted))}")

    top_accepted = sorted(every | {"device", "policy", "sampling"} | {g.split()[0] for g in groups})
    for k, v in raw.items():
        key = _key(k)
        if key == "policy" and isinstance(v, dict):
            policy = _policy(v, where)
        elif key == "policy":
            policy = _policy({"name": v}, where)
        elif key == "sampling":
            if not isinstance(v, dict):
                raise InfinichatError(f"{where}: [sampling] must be a table of sampling options")
            sampling_dests = {
                d for p in leaves.values() for d, a in option_actions(p).items() if _group_title(p, a) == "sampling"
            }
            for sk, sv in v.items():
                if _key(sk) not in sampling_dests:
                    raise unknown(_key(sk), " in [sampling]", sorted(sampling_dests))
                sampling[_key(sk)] = sv
        elif key in {g.split()[0] for g in groups} and isinstance(v, dict):
            _sections(key, v, leaves, sections, where)
        elif key in every or key == "device":
            shared[key] = v
        else:
            raise unknown(key, "", top_accepted)
    return ConfigFile(str(path), shared, policy, sampling, sections)


def _group_title(parser: argparse.ArgumentParser, action: argparse.Action) -> str | None:
    for group in parser._action_groups:
        if action in group._group_actions:
            return group.title
    return None


def _policy(v: Mapping[str, Any], where: str) -> PolicySection:
    out = PolicySection()
    for k, val in v.items():
        key = _key(k)
        if key not in POLICY_KEYS:
            raise InfinichatError(f"{where}: unknown key {key!r} in [policy]; accepted: {', '.join(POLICY_KEYS)}")
        if key == "name":
            names = val if isinstance(val, list) else str(val).split(",")
            out.names = [str(n).strip() for n in names if str(n).strip()]
        elif key == "params":
            if not isinstance(val, dict):
                raise InfinichatError(f"{where}: [policy] params must be a table of NAME = VALUE")
            out.params = {_key(pk): pv for pk, pv in val.items()}
        elif key in ("budget", "n_sink"):
            if not isinstance(val, int) or isinstance(val, bool):
                raise InfinichatError(f"{where}: [policy] {key} must be an integer, got {val!r}")
            setattr(out, key, val)
        else:
            if not isinstance(val, (int, float)) or isinstance(val, bool):
                raise InfinichatError(f"{where}: [policy] budget_frac must be a number, got {val!r}")
            out.budget_frac = float(val)
    return out


def _sections(
    group: str,
    v: Mapping[str, Any],
    leaves: Mapping[str, argparse.ArgumentParser],
    sections: dict[str, dict[str, Any]],
    where: str,
) -> None:
    """`[eval]` (keys of any eval command), `[eval.passkey]` (keys of that command), `[chat]` (a leaf)."""
    mine = {name: p for name, p in leaves.items() if name.split()[0] == group}
    subnames = {name.split()[1] for name in mine if " " in name}
    group_dests = {d for p in mine.values() for d in option_actions(p)} | {"device"}
    flat: dict[str, Any] = {}
    for k, val in v.items():
        key = _key(k)
        if isinstance(val, dict) and str(k) in subnames:
            leaf = f"{group} {k}"
            dests = set(option_actions(mine[leaf])) | {"device"}
            for lk in val:
                if _key(lk) not in dests:
                    raise InfinichatError(
                        f"{where}: unknown key {_key(lk)!r} in [{group}.{k}]; accepted: {', '.join(sorted(dests))}"
                    )
            sections[leaf] = {_key(lk): lv for lk, lv in val.items()}
        elif key in group_dests:
            flat[key] = val
        else:
            accepted = sorted(group_dests | {f"{group}.{s}" for s in subnames})
            raise InfinichatError(f"{where}: unknown key {key!r} in [{group}]; accepted: {', '.join(accepted)}")
    sections[group] = flat


# ------------------------------------------------------------------------------------------------- mapping


def _convert(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """A file value as the option's parsed value (what argparse would store)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise InfinichatError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(key, x, action, where) for x in items]
    return _convert_one(key, value, action, where)


def _convert_one(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    if isinstance(value, (dict, bool, list)) and action.type in (int, float):  # (a list: not joined into "64")
        what = "an integer" if action.type is int else "a number"
        raise InfinichatError(f"{where}: {key} must be {what}, got {json.dumps(value)}")
    if isinstance(value, (dict, bool)) and action.type is not None:
        raise InfinichatError(f"{where}: {key} must be a {getattr(action.type, '__name__', 'value')}, got {value!r}")
    if isinstance(value, dict):
        raise InfinichatError(f"{where}: {key} must be a value, not a table")
    if isinstance(value, list):
        value = ",".join(str(x) for x in value)  # lists of lengths, policies, ... -> the option's "a,b,c"
    if action.type is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise InfinichatError(f"{where}: {key} must be an integer, got {value!r}")
    if action.type is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InfinichatError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
    if action.type is None and value is not None:
        value = str(value).lower() if isinstance(value, bool) else str(value)
    if action.choices is not None and value not in action.choices:
        raise InfinichatError(f"{where}: {key} = {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _param_items(section: PolicySection, scoped: bool) -> list[str]:
    """`params` as --param items: scoped to the policy (POLICY.NAME=VALUE) where there is one name."""
    items = []
    for k, v in section.params.items():
        text = ",".join(str(x) for x in v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
        prefix = f"{section.names[0]}." if scoped and len(section.names) == 1 else ""
        items.append(f"{prefix}{k}={text}")
    return items


def defaults_for(cfg: ConfigFile, command: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The option values (by dest) that `cfg` gives `command` (e.g. "eval passkey"), checked and converted."""
    actions = option_actions(parser)
    where = f"--config {cfg.path}"
    out: dict[str, Any] = {}

    def put(key: str, value: Any, strict: bool) -> None:
        if key == "device" and "device" not in actions:
            if str(value).lower() != "cpu":
                raise InfinichatError(
                    f"{where}: device {value!r}: `infinichat {command}` has no --device option and runs on the "
                    "CPU; accepted: cpu"
                )
            return
        if key not in actions:
            if strict:
                raise InfinichatError(
                    f"{where}: `infinichat {command}` takes no {key!r}; accepted: {', '.join(sorted(actions))}"
                )
            return
        out[key] = _convert(key, value, actions[key], where)

    for k, v in cfg.shared.items():
        put(k, v, strict=False)
    p = cfg.policy
    exclusive = [{a.dest for a in g._group_actions} for g in parser._mutually_exclusive_groups]
    frac_wins = p.budget_frac is not None and any({"budget", "budget_frac"} <= g for g in exclusive)
    for key in POLICY_KEYS:
        value: Any = getattr(p, "names" if key == "name" else key)
        if value in (None, [], {}) or (key == "budget" and frac_wins):
            continue  # a command that takes one of budget / budget_frac (eval) gets the fraction
        dest = next((d for d in POLICY_TARGETS[key] if d in actions), None)
        if dest is None:
            continue  # the command has no such option (chat has no budget fraction): the section is shared
        if key == "name":
            value = value if isinstance(actions[dest], argparse._AppendAction) else ",".join(value)
        elif key == "params":
            value = _param_items(p, scoped=True)
        elif key == "budget_frac" and command == "bench latency":
            value = ",".join(f"{n}={p.budget_frac}" for n in p.names)
        out[dest] = _convert(dest, value, actions[dest], where)
    for k, v in cfg.sampling.items():
        put(k, v, strict=False)
    group = command.split()[0]
    if group != command:
        for k, v in cfg.sections.get(group, {}).items():
            put(k, v, strict=False)  # [eval] holds keys of any eval command
    for k, v in cfg.sections.get(command, {}).items():
        put(k, v, strict=True)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with the values of `--config FILE` (if given) as the command's defaults."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    import sys

    tokens = list(sys.argv[1:] if argv is None else argv)
    found = command_of(parser, tokens)
    if found is None:
        return args
    command, leaf = found
    builtin = {a.dest: a.default for a in leaf._actions}  # set_defaults below replaces the actions' defaults
    leaf.set_defaults(**defaults_for(load(path, parser), command, leaf))
    final = parser.parse_args(tokens)
    for group in leaf._mutually_exclusive_groups:  # one given on the command line: the file's others step back
        given = [a for a in group._group_actions if getattr(args, a.dest) != builtin[a.dest]]
        if given:
            for a in group._group_actions:
                if a not in given:
                    setattr(final, a.dest, builtin[a.dest])
    return final


def namespace(path: str | Path, command: str = "chat", extra: Sequence[str] = ()) -> argparse.Namespace:
    """The options `command` would run with from the file `path` (plus `extra` command-line arguments)."""
    from infinichat.cli.main import build_parser

    parser = build_parser()
    return parse_args(parser, [*command.split(), *extra, "--config", str(path)])
