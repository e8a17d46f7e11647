"""`infinichat` command line: chat, story, generate, eval."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from infinichat import __version__
from infinichat.errors import InfinichatError

log = logging.getLogger("infinichat")

DEFAULT_DTYPE = "bfloat16"  # measured faster than float32 on CPU for decode and prefill (README, benchmarks/)
EVAL_DTYPE = "float32"  # eval: ppl within 0.03% of bfloat16 and 1.5x faster in 64-token chunks (README)
STORY_DEFAULT = "a lighthouse keeper who finds a message in a bottle"


def _add_model_args(p: argparse.ArgumentParser, dtype: str = DEFAULT_DTYPE, ctx: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a .gguf file or a Hugging Face checkpoint folder "
                   "(default: the embedded SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("--backend", default="torch", choices=("torch", "llamacpp"),
                   help="torch: our PyTorch engine (every KV policy); llamacpp: llama.cpp on the quantized GGUF "
                   "file (needs llama-cpp-python: pip install 'infinichat[llamacpp]') (default torch)")
    g.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16", "float16"),
                   help=f"compute dtype of the torch backend (default {dtype})")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores; more "
                   "threads than free cores slows llama.cpp down badly)")
    if ctx:
        g.add_argument("--ctx", type=int, default=0, metavar="N",
                       help="KV cache budget in tokens; past it the oldest tokens are evicted "
                       "(StreamingLLM: the first tokens stay as attention sinks) (default: the trained context)")
    g.add_argument("--cache-dir", metavar="DIR", help="where converted models are cached "
                   "(default: $INFINICHAT_CACHE or ~/.cache/infinichat)")


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
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluation: long-text perplexity under KV policies")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    p = ev_sub.add_parser("ppl", help="token-by-token perplexity over a long text, per KV policy (JSON + PNG)")
    p.add_argument("--text", metavar="FILE", help="the UTF-8 text to evaluate (required)")
    p.add_argument("--policy", action="append", default=[], metavar="NAMES",
                   help="KV policies: full, window, streaming, recompute; repeatable or comma-separated "
                   "(default: full,window,streaming). full runs up to the trained context, then stops")
    p.add_argument("--budget", type=int, default=1024, help="KV budget in tokens, sinks included (default 1024)")
    p.add_argument("--sinks", type=int, default=4, help="attention sinks of the streaming policy (default 4)")
    p.add_argument("--chunk", type=int, default=64,
                   help="tokens per forward call, 1..64; the budget holds at every chunk (default 64; 1 = exact)")
    p.add_argument("--discard", type=int, default=None, metavar="N",
                   help="tokens evicted at once when the budget is reached (default: the chunk size)")
    p.add_argument("--tokens", type=int, default=20000, help="tokens of the text to evaluate (default 20000)")
    p.add_argument("--out", metavar="DIR", help="where ppl.json, ppl.png, ppl.md go (default results/ppl-<time>/)")
    _add_model_args(p, dtype=EVAL_DTYPE, ctx=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinichat",
        description="LLM conversations of unlimited length inside a fixed memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"infinichat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal (type :exit to leave)")
    chat.add_argument("--system", default=None, help="system prompt (default: the model's own)")
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

    _add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        from infinichat.cli import commands, eval_cmd

        return {"chat": commands.chat, "story": commands.story, "generate": commands.generate,
                "eval": eval_cmd.run}[args.command](args)
    except InfinichatError as e:
        print(f"infinichat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
