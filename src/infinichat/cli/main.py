"""`infinichat` command line: chat, story, generate, serve, eval, bench; `--config FILE` on every command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from infinichat import __version__
from infinichat.cli.chat_commands import COMMANDS
from infinichat.errors import InfinichatError, gpu_out_of_memory

log = logging.getLogger("infinichat")

DEFAULT_DTYPE = "bfloat16"  # measured faster than float32 on CPU for decode and prefill (README, benchmarks/)
EVAL_DTYPE = "float32"  # eval: ppl within 0.03% of bfloat16 and 1.5x faster in 64-token chunks (README)
STORY_DEFAULT = "a lighthouse keeper who finds a message in a bottle"


def _add_model_args(p: argparse.ArgumentParser, dtype: str = DEFAULT_DTYPE, ctx: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="PATH",
        help="a .gguf file or a Hugging Face checkpoint folder (default: the embedded SmolLM2-135M-Instruct Q4_1)",
    )
    g.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "llamacpp"),
        help="torch: our PyTorch engine (every KV policy); llamacpp: llama.cpp on the quantized GGUF "
        "file (needs llama-cpp-python: pip install 'infinichat[llamacpp]') (default torch)",
    )
    g.add_argument(
        "--dtype",
        default=dtype,
        choices=("float32", "bfloat16", "float16"),
        help=f"compute dtype of the torch backend (default {dtype})",
    )
    g.add_argument(
        "--quant",
        default="none",
        choices=("none", "int8", "int4"),
        help="store the weights as int8 or int4 (per group of 32 inputs; int8 per row on CUDA and where the "
        "native library cannot be built) for faster decode (CPU: native kernels; CUDA: PyTorch's int8/int4 "
        "kernels); needs --dtype bfloat16; quantized once, then cached (default none)",
    )
    g.add_argument(
        "--kv-dtype",
        default="auto",
        choices=("auto", "bf16", "f16", "f32", "int8", "int4", "int8h", "int4h"),
        help="how the torch backend's KV cache holds keys and values: auto (the --dtype), bf16, f16, f32, int8 (per "
        "token and head, ~1.9x smaller than bf16) or int4 (KIVI: keys per channel, values per token, the last "
        "64-95 tokens in full precision, ~3x smaller); int8h / int4h: the same with the keys multiplied by a "
        "Hadamard matrix before quantization (head_dim a power of 2); budgets stay in tokens (default auto)",
    )
    g.add_argument(
        "--device",
        default="auto",
        metavar="{auto,cpu,cuda,cuda:N}",
        help="where the torch backend runs the model and keeps its KV cache (auto: CUDA when torch sees a "
        "GPU, else the CPU) (default auto)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="CUDA only: decode through a static-shape step captured with torch.compile (CUDA graphs); the KV "
        "cache is preallocated at its whole budget (--ctx) and the first steps compile (slow start); suits one long "
        "generation, not many sessions (untested on a GPU so far: see README, GPU)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default 0: torch chooses at run time, up to the physical cores, from the measured "
        "decode steps; llama.cpp uses the physical cores, and more threads than free cores slow it down badly)",
    )
    if ctx:
        g.add_argument(
            "--ctx",
            type=int,
            default=0,
            metavar="N",
            help="KV cache budget in tokens; past it the oldest tokens are evicted "
            "(StreamingLLM: the first tokens stay as attention sinks) (default: the trained context)",
        )
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where converted models are cached (default: $INFINICHAT_CACHE or ~/.cache/infinichat)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.1)
    g.add_argument("--repeat-last-n", type=int, default=64, help="look-back window of the penalties (-1 = all)")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--dry-multiplier", type=float, default=0.8, help="DRY repetition penalty scale (0 = off)")
    g.add_argument("--dry-base", type=float, default=1.75, help="DRY growth per token of repeat (>= 1)")
    g.add_argument("--dry-allowed-length", type=int, default=2, help="DRY: repeats this long or longer are penalised")
    g.add_argument(
        "--dry-penalty-last-n", type=int, default=-1, help="DRY look-back window in tokens (-1 = the cache, 0 = off)"
    )
    g.add_argument(
        "--dry-sequence-breaker",
        action="append",
        default=None,
        metavar="TEXT",
        help="DRY sequence breaker (repeatable; replaces the defaults \\n : \" *; 'none' = no breakers)",
    )
    g.add_argument("--xtc-probability", type=float, default=0.0, help="XTC: chance per token that it acts (0 = off)")
    g.add_argument(
        "--xtc-threshold", type=float, default=0.1, help="XTC: removes top tokens with p >= this (> 0.5 = off)"
    )
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluation under KV policies: perplexity, passkey, niah, ruler, multiturn, longbench, infinitebench",
    )
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    p = ev_sub.add_parser("ppl", help="token-by-token perplexity over a long text, per KV policy (JSON + PNG)")
    p.add_argument("--text", metavar="FILE", help="the UTF-8 text to evaluate (required)")
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAMES",
        help="KV policies: full, window, streaming, recompute, h2o, tova; repeatable or comma-separated "
        "(default: full,window,streaming). full runs up to the trained context, then stops",
    )
    p.add_argument("--budget", type=int, default=1024, help="KV budget in tokens, sinks included (default 1024)")
    p.add_argument("--sinks", type=int, default=4, help="attention sinks of the streaming policy (default 4)")
    p.add_argument(
        "--chunk",
        type=int,
        default=64,
        help="tokens per forward call, 1..64; the budget holds at every chunk (default 64; 1 = exact)",
    )
    p.add_argument(
        "--discard",
        type=int,
        default=None,
        metavar="N",
        help="tokens evicted at once when the budget is reached (default: the chunk size)",
    )
    p.add_argument("--tokens", type=int, default=20000, help="tokens of the text to evaluate (default 20000)")
    p.add_argument("--out", metavar="DIR", help="where ppl.json, ppl.png, ppl.md go (default results/ppl-<time>/)")
    _add_model_args(p, dtype=EVAL_DTYPE, ctx=False)
    _add_long_eval_parsers(ev_sub)


def _add_long_context_args(
    p: argparse.ArgumentParser, max_new: str, chat_flag: bool = True, resume: str | None = None
) -> None:
    """Flags shared by eval passkey / niah / longbench: policies, budgets, decoding, output."""
    g = p.add_argument_group("KV policies")
    g.add_argument(
        "--policies",
        default="full,streaming",
        metavar="NAMES",
        help="comma-separated KV policies from the registry, e.g. full,streaming,h2o,tova,snapkv,omnikv "
        "(default full,streaming); full keeps everything and runs once",
    )
    b = g.add_mutually_exclusive_group()
    b.add_argument("--budget", metavar="N[,N...]", help="KV budget(s) in tokens, absolute")
    b.add_argument(
        "--budget-frac",
        metavar="F[,F...]",
        help="KV budget(s) as a fraction of each prompt's length, e.g. 0.25,0.5 (default 0.25)",
    )
    g.add_argument(
        "--n-sink",
        type=int,
        default=None,
        metavar="N",
        help="attention sinks for every policy that has them (window keeps none) (default: the policy's)",
    )
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="[POLICY.]NAME=VALUE",
        help="a policy parameter, e.g. streaming.n_discard=64 or n_sink=8 (repeatable)",
    )
    g = p.add_argument_group("decoding and output")
    g.add_argument(
        "--max-new-tokens", type=int, default=None, metavar="N", help=f"greedy tokens per answer ({max_new})"
    )
    if chat_flag:
        g.add_argument(
            "--no-chat-template", action="store_true", help="plain-text prompts instead of the model's chat template"
        )
    g.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default 0)")
    g.add_argument(
        "--out", metavar="DIR", help="where the JSON, Markdown and PNG files go (default results/<task>-<time>/)"
    )
    if resume is not None:
        g.add_argument(
            "--resume",
            action="store_true",
            help=f"complete the run in --out: every record is appended to {resume}.jsonl as soon as it is scored "
            "(the tables are rewritten after each finished cell); this skips the records already there, if the "
            "settings (model, dtypes, seed, lengths, samples, ...) are the same",
        )
    _add_model_args(p, dtype=EVAL_DTYPE, ctx=False)


def _add_long_eval_parsers(ev_sub: argparse._SubParsersAction) -> None:
    """eval passkey / niah / longbench."""
    for name, help_text in (
        ("passkey", "passkey retrieval: a 5-digit key hidden in filler, per policy x length x depth"),
        ("niah", "RULER-style needle in a haystack (single, multikey, value7), per policy x length x depth"),
    ):
        p = ev_sub.add_parser(name, help=help_text)
        g = p.add_argument_group("prompts")
        g.add_argument(
            "--lengths",
            default="1024,2048,4096,7168",
            metavar="N,N...",
            help="prompt lengths in model tokens (default 1024,2048,4096,7168)",
        )
        g.add_argument(
            "--depths",
            default="0.1,0.3,0.5,0.7,0.9",
            metavar="D,D...",
            help="needle depths, fractions of the haystack before it (default 0.1,0.3,0.5,0.7,0.9)",
        )
        g.add_argument("--samples", type=int, default=1, help="prompts per length x depth, at most 10000 (default 1)")
        if name == "niah":
            g.add_argument("--variant", default="single", help="single, multikey or value7 (default single)")
            g.add_argument("--n-keys", type=int, default=4, help="multikey needles, 2 to 100 (default 4)")
            g.add_argument(
                "--haystack",
                metavar="FILE",
                help="a UTF-8 text file as the haystack (default: generated essay-like text)",
            )
        _add_long_context_args(p, "default 12" if name == "passkey" else "default 32", resume=name)
    p = ev_sub.add_parser(
        "ruler",
        help="a RULER subset (niah single/multikey/multivalue/multiquery, vt, cwe), generated, "
        "per policy x task x length",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--tasks",
        default="niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe",
        metavar="T,T...",
        help="RULER tasks (default: all six: niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe)",
    )
    g.add_argument("--lengths", default="4096", metavar="N,N...", help="prompt lengths in model tokens (default 4096)")
    g.add_argument(
        "--samples",
        type=int,
        default=3,
        help="prompts per task x length, at most 10000; sample i of n puts its needle at depth (i + 0.5) / n "
        "(default 3)",
    )
    _add_long_context_args(p, "default: RULER's per task, 32 to 64", resume="ruler")
    p = ev_sub.add_parser(
        "multiturn",
        help="several questions about one long context in successive turns of one KV sequence (SCBench-style), "
        "per policy x turn",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--lengths", default="4096", metavar="N,N...", help="tokens of turn 1: context + first question (default 4096)"
    )
    g.add_argument(
        "--turns",
        type=int,
        default=4,
        help="facts in the context, one question per turn, 1 to 100 (default 4); with --data: at most this many "
        "questions of one context",
    )
    g.add_argument("--samples", type=int, default=3, help="conversations per length, at most 10000 (default 3)")
    g.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="a LongBench-format JSONL file (context, input, answers) instead of the generated haystack: the "
        "records of one context are one conversation, its questions the turns; the context is cut in the middle "
        "to the length; scored with the dataset's LongBench metric (default: the generated haystack)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="with --data: the dataset of records without a 'dataset' field (default: from the file name)",
    )
    _add_long_context_args(
        p, "default 12; with --data: the dataset's LongBench answer length", chat_flag=False, resume="multiturn"
    )
    p = ev_sub.add_parser("longbench", help="LongBench-format JSONL files (--data), official prompts and metrics")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", default=[], metavar="FILE", help="a LongBench JSONL file (repeatable)")
    g.add_argument(
        "--dataset", default=None, help="the dataset of records without a 'dataset' field (default: from the file name)"
    )
    g.add_argument("--limit", type=int, default=None, metavar="N", help="at most N records per file")
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        metavar="N",
        help="prompts longer than N tokens are "
        "cut in the middle (default: the trained context - the answer length - 64)",
    )
    _add_long_context_args(p, "default: the dataset's LongBench answer length", resume="longbench")

    p = ev_sub.add_parser(
        "infinitebench",
        help="InfiniteBench-format JSONL files (--data) or generated passkey / kv_retrieval, official prompts and "
        "scorers",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", action="append", default=[], metavar="FILE", help="an InfiniteBench JSONL file (repeatable)"
    )
    g.add_argument("--task", default=None, help="the task of every --data file (default: from the file name)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="at most N records per file")
    g.add_argument(
        "--generate",
        default=None,
        metavar="TASKS",
        help="also generate records of these tasks (passkey,kv_retrieval), written next to the results",
    )
    g.add_argument("--gen-samples", type=int, default=5, metavar="N", help="generated records per task (default 5)")
    g.add_argument(
        "--gen-length", type=int, default=4096, metavar="N", help="tokens of a generated prompt, at most (default 4096)"
    )
    g.add_argument(
        "--prompts",
        default="open",
        choices=("open", "chat"),
        help="open: InfiniteBench's prompts for open models, plain text ending in an answer prefix; chat: its "
        "GPT-4 prompts inside the model's chat template (default open)",
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        metavar="N",
        help="prompts longer than N tokens are cut in the middle (default: the trained context - the answer "
        "length - 64)",
    )
    _add_long_context_args(
        p, "default: the task's InfiniteBench answer length", chat_flag=False, resume="infinitebench"
    )

    f = ev_sub.add_parser(
        "filter-layers",
        help="OmniKV: how well each layer's top-k picks cover the later "
        "layers' attention on a text; recommends filter layers (JSON + PNG + table)",
    )
    f.add_argument("--text", metavar="FILE", help="the UTF-8 text to measure on (required)")
    f.add_argument(
        "--tokens", type=int, default=4096, help="tokens of the text (default 4096, at most the trained context)"
    )
    f.add_argument(
        "--k",
        action="append",
        default=[],
        metavar="K",
        help="tokens picked: a count (256) or a "
        "fraction of the context (0.1); repeatable or comma-separated (default 0.1,0.05,0.2; the "
        "recommendation is for the first)",
    )
    f.add_argument("--queries", type=int, default=64, help="the text's last tokens act as decode steps (default 64)")
    f.add_argument("--sinks", type=int, default=4, help="first tokens always picked (default 4, as omnikv)")
    f.add_argument("--filters", type=int, default=3, help="how many filter layers to recommend (default 3)")
    f.add_argument(
        "--max-first",
        type=int,
        default=None,
        metavar="L",
        help="deepest first filter layer (default: a fifth of the layers)",
    )
    f.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="coverage a shallower first filter layer "
        "may give up: the layers before it attend fully, which costs speed (default 0.005)",
    )
    f.add_argument(
        "--out", metavar="DIR", help="where filter_layers.{json,png,md} go (default results/filter-layers-<time>/)"
    )
    _add_model_args(f, dtype=EVAL_DTYPE, ctx=False)


_SERVE_LIMITS = """request limits (a 400 names the field): body 16 MB; text valid Unicode (no lone surrogates);
message / system prompt / RAG text 200000 characters; session name 256, user_name 64; stop: 4 strings of
64 characters; max_tokens 16384; budget in [64, --max-budget]; temperature 0 or [0.001, 100];
repetition_penalty [0.01, 100]. Changing /api and /v1 requests with a body need Content-Type:
application/json (else 415); a foreign Origin gets 403 (see --cors-origins), a foreign Host 400."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinichat",
        description="LLM conversations of unlimited length inside a fixed memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"infinichat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    chat = sub.add_parser(
        "chat",
        help="chat in the terminal (:help lists the commands, :exit leaves)",
        description="Chat in the terminal, in-process or with --server. Flags that are session settings "
        "(sampling, --ctx, --policy) set a new session's settings and change a reopened one's (it says which). "
        "Commands: " + ", ".join(f"{c.name} {c.args}".strip() for c in COMMANDS) + ".",
    )
    chat.add_argument("--system", default=None, help="system prompt of a new session (default: the model's own)")
    chat.add_argument(
        "--session",
        default=None,
        metavar="NAME",
        help="session to open or create (default: a new one named chat-<time>)",
    )
    chat.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="chat through an infinichat server (e.g. http://127.0.0.1:8000) instead of in-process",
    )
    chat.add_argument("--api-key", default=None, help="the server's API key (with --server)")
    chat.add_argument(
        "--plain",
        action="store_true",
        help="print replies as plain text, not rendered as Markdown (always so when stdout is not a terminal)",
    )
    chat.add_argument(
        "--policy", default=None, help="eviction policy of the session (default: the session default, turns)"
    )
    chat.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="sessions database, in-process mode (default $INFINICHAT_DATA or ~/.local/share/infinichat)",
    )
    _add_model_args(chat)
    _add_sampling_args(chat, max_tokens=512, temperature=0.7)

    story = sub.add_parser("story", help="the story-teller: writes a story, streaming")
    story.add_argument("prompt", nargs="?", default=STORY_DEFAULT, help="what the story is about")
    _add_model_args(story)
    _add_sampling_args(story, max_tokens=1024, temperature=0.8)

    gen = sub.add_parser("generate", help="plain completion of a prompt, streaming")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--show-probs", action="store_true", help="print each token's probability after the text")
    _add_model_args(gen)
    _add_sampling_args(gen, max_tokens=128, temperature=0.7)

    serve = sub.add_parser(
        "serve",
        help="the chat server: session API, OpenAI-compatible API, web page",
        epilog=_SERVE_LIMITS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /api and /v1")
    serve.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="sessions database and KV files (default $INFINICHAT_DATA or ~/.local/share/infinichat)",
    )
    serve.add_argument("--budget", type=int, default=None, help="default KV budget of a session, tokens (2048)")
    serve.add_argument("--policy", default=None, help="default eviction policy of a session (turns)")
    serve.add_argument(
        "--kv-cap-mb",
        type=int,
        default=None,
        help="resident KV memory of all sessions; past it, idle caches go to disk (default 1024; on a GPU at most "
        "45%% of its memory free after the model)",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="generations decoded together in one forward call (1: one at a time; default 8)",
    )
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="while other replies stream, prompts get at most this many tokens per round of the worker (new "
        "requests' short prompts share one forward call), with the other replies' next tokens in between (0: each "
        "prompt in one go, not batched; default 256)",
    )
    serve.add_argument(
        "--prefill-group",
        type=int,
        default=32,
        metavar="N",
        help="prompt chunks of several requests share one forward call while they total at most N tokens (0 or 1: "
        "each request's chunk in its own call; default 32)",
    )
    serve.add_argument(
        "--max-header-kb",
        type=int,
        default=64,
        help="a request's line and headers together, KiB (one line at most 32); more get 431 (default 64)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting or running at once; more get 429 (default 64)"
    )
    serve.add_argument(
        "--kv-limit-mb",
        type=int,
        default=None,
        help="hard limit of resident KV memory: past it, new generations get 503 while running ones hold it "
        "(default twice --kv-cap-mb; on a GPU at most 85%% of its memory free after the model)",
    )
    serve.add_argument(
        "--max-budget",
        type=int,
        default=None,
        metavar="N",
        help="the largest KV budget (tokens) a client may give a session (default: the model's trained context, "
        "and at most what half of --kv-cap-mb holds)",
    )
    serve.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="H1,H2",
        help="names the Host header may carry (default: 127.0.0.1, localhost, ::1 and the --host address; "
        "'*' = any); other hosts get 400, which stops DNS-rebinding pages",
    )
    serve.add_argument(
        "--cors-origins",
        default=None,
        metavar="O1,O2",
        help="web origins (e.g. https://app.example) whose pages may call the API (default: none; '*' = any)",
    )
    serve.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="the session database: postgresql://user:password@host:port/dbname (shared by the replicas of a "
        "cluster; pip install 'infinichat[cluster]') or sqlite:///path (default: sessions.sqlite3 in --data-dir)",
    )
    serve.add_argument(
        "--kv-dir",
        default=None,
        metavar="DIR",
        help="where idle sessions' KV caches are written (default: DATA_DIR/kv; a directory every replica reaches "
        "in a cluster)",
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="serve with N engine replicas on a Ray Serve cluster, each session pinned to one replica "
        "(pip install 'infinichat[cluster]'; --threads and --device apply to each replica; default: one process)",
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|ADDR",
        help="with --replicas: the Ray cluster to join ('auto': the one `ray start --head` runs on this machine; "
        "default: start a local one)",
    )
    _add_model_args(serve, ctx=False)

    _add_eval_parser(sub)
    from infinichat.cli.bench_cmd import add_parser as add_bench_parser

    add_bench_parser(sub, lambda p, ctx: _add_model_args(p, ctx=ctx))
    from infinichat.config_file import leaf_parsers

    for leaf in leaf_parsers(parser).values():
        leaf.add_argument(
            "--config",
            metavar="FILE",
            help="a TOML (or YAML) file of this command's options (model, dtype, [policy], [sampling], ...); "
            "the command line overrides it (README: Config files)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        from infinichat.config_file import parse_args

        args = parse_args(parser, argv)  # --config FILE: the file's values become the command's defaults
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        if args.command == "serve" and args.replicas is not None:  # a Ray Serve application (server/cluster.py)
            from infinichat.server.app import serve_cluster

            return serve_cluster(args)
        if args.command == "serve":  # the port answers before anything heavy is imported (server/startup.py)
            from infinichat.server.startup import serve

            return serve(args)
        from infinichat.cli import bench_cmd, commands, eval_cmd

        return {
            "chat": commands.chat,
            "story": commands.story,
            "generate": commands.generate,
            "eval": eval_cmd.run,
            "bench": bench_cmd.run,
        }[args.command](args)
    except InfinichatError as e:
        print(f"infinichat: error: {e}", file=sys.stderr)  # noqa: T201  (the CLI's error line)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)  # noqa: T201  (ends the interrupted line)
        return 130
    except MemoryError as e:  # torch.OutOfMemoryError (a GPU's) is a RuntimeError, not one of these
        print(  # noqa: T201  (the CLI's error line)
            f"infinichat: error: out of memory ({e}); try a smaller --budget, --quant int4 or a smaller model",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:
        if not gpu_out_of_memory(e):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(  # noqa: T201  (the CLI's error line)
            f"infinichat: error: the GPU ran out of memory ({first}); try a smaller --budget, --quant int4 or "
            "--kv-dtype int8",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
