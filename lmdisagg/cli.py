"""The ``lmdisagg`` command line.

    lmdisagg model fetch smollm2-135m        download + convert once; prints the model dir last
    lmdisagg model list                      known names and what is cached
    lmdisagg generate --model M --prompt P [--chat] [--max-tokens N] [--temperature T] [--json]
                      [--json-schema S | --json-object | --regex R | --choice C ... | --grammar G]
    lmdisagg transports [--json]             which KV transports work here, and how they launch

Subcommands of later layers (serve, simulate) register themselves in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lmdisagg.errors import InvalidRequestError, LmdisaggError


def _cmd_model(args) -> int:
    from lmdisagg.models import model_home
    from lmdisagg.models.registry import DUMMY_SHAPES, FETCHABLE
    if args.action == "fetch":
        from lmdisagg.models.fetch import fetch
        print(fetch(args.name, force=args.force))
    else:
        for name in sorted(FETCHABLE):
            d = model_home() / name
            print(f"{name:22s} {'cached at ' + str(d) if d.exists() else 'not fetched'}")
        for name in sorted(DUMMY_SHAPES):
            print(f"{name:22s} dummy weights (token ids only)")
    return 0


def _cmd_generate(args) -> int:
    from lmdisagg.engine import Engine, SamplingParams
    engine = Engine(model=args.model, device=args.device, dtype=args.dtype, chunk_tokens=args.chunk_tokens)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos,
                            structured=_structured(args))
    ids = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else engine.encode(args.prompt)
    r = engine.generate(ids, params)[0]
    if args.json:
        print(json.dumps({"text": r.text, "token_ids": r.token_ids, "prompt_tokens": r.prompt_tokens,
                          "cached_tokens": r.cached_tokens, "finish_reason": r.finish_reason}))
    else:
        print(r.text)
    return 0


def _text_or_file(value: str) -> str:
    """An option's value, or the contents of the file it names (``@path``)."""
    if value.startswith("@"):
        try:
            return Path(value[1:]).expanduser().read_text()
        except OSError as e:
            raise InvalidRequestError(f"cannot read {value[1:]}: {e}") from None
    return value


def _structured(args):
    """SamplingParams.structured from --json-schema / --json-object / --regex / --choice / --grammar."""
    if args.json_schema is not None:
        return "json", _text_or_file(args.json_schema)
    if args.json_object:
        return "json", ""
    if args.regex is not None:
        return "regex", args.regex
    if args.choice:
        return "choice", list(args.choice)
    if args.grammar is not None:
        return "grammar", _text_or_file(args.grammar)
    return None


def _cmd_transports(args) -> int:
    from lmdisagg.transports.report import format_report, report
    r = report()
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmdisagg", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="fetch or list models")
    m.add_argument("action", choices=["fetch", "list"])
    m.add_argument("name", nargs="?", default="smollm2-135m")
    m.add_argument("--force", action="store_true", help="re-download and re-convert")
    m.set_defaults(func=_cmd_model)

    g = sub.add_parser("generate", help="run one prompt on a local engine")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--chunk-tokens", type=int, default=256)
    g.add_argument("--json", action="store_true", help="print one JSON line")
    so = g.add_mutually_exclusive_group()  # structured outputs (xgrammar)
    so.add_argument("--json-schema", metavar="SCHEMA", help="the output fits this JSON schema (text, or @file)")
    so.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    so.add_argument("--regex", help="the output matches this regular expression")
    so.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    so.add_argument("--grammar", metavar="EBNF", help="the output follows this EBNF grammar (text, or @file)")
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("transports", help="which KV transports work on this machine, and how they launch")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.set_defaults(func=_cmd_transports)

    for register in COMMANDS:
        register(sub)
    return p


def _register_later_commands() -> list:
    cmds = []
    for mod in ("lmdisagg.serve_cli", "lmdisagg.router.simulate_cli"):
        try:
            cmds.append(__import__(mod, fromlist=["register"]).register)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return cmds


COMMANDS = _register_later_commands()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LmdisaggError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
