"""``lmdisagg serve --config FILE [--port N]``: deploy, serve until SIGINT/SIGTERM, tear down.

Also the entrypoint of ``ray job submit --working-dir . -- lmdisagg serve --config ...``: inside a
job, RAY_ADDRESS points at the job's cluster and the actors join it.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

log = logging.getLogger("lmdisagg.serve")


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a deployment (OpenAI API) until interrupted")
    s.add_argument("--config", required=True, help="cluster config YAML (see cluster_configs/)")
    s.add_argument("--port", type=int, default=None, help="override router.port (0 = any free port)")
    s.add_argument("--host", default=None, help="override router.host")
    s.add_argument("--policy", default=None, help="override router.policy")
    s.add_argument("--model", default=None, help="override model")
    s.add_argument("--api-key", default=None, help="override router.api_key (prefer LMDISAGG_API_KEY: arguments "
                                                   "are visible to every user of the machine)")
    s.add_argument("--tool-call-parser", default=None, help="override router.tool_call_parser (hermes, llama3_json, "
                                                            "mistral): tool_choice 'auto' reads calls in this format")
    s.add_argument("--chat-template", default=None, help="override router.chat_template: a Jinja chat template "
                                                         "file (or the template itself) instead of the model's")
    s.set_defaults(func=run)


def run(args) -> int:
    from lmdisagg.config import ClusterConfig
    from lmdisagg.pipeline import Pipeline
    cfg = ClusterConfig.from_yaml(args.config)
    router = {k: v for k, v in {"port": args.port, "host": args.host, "policy": args.policy,
                                "api_key": args.api_key, "tool_call_parser": args.tool_call_parser,
                                "chat_template": args.chat_template}.items()
              if v is not None}
    cfg = cfg.with_overrides(**({"router": router} if router else {}), **({"model": args.model} if args.model else {}))
    pipe = Pipeline.from_config(cfg)
    stop = asyncio.Event()

    async def main() -> None:
        from lmdisagg.router.router import Router
        from lmdisagg.router.server import OpenAIServer, start_site
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        workers = await asyncio.to_thread(pipe.deploy_workers)
        runner = None
        try:
            pipe.router = Router(cfg, workers, pipe._tokenizer())
            runner, port = await start_site(OpenAIServer(pipe.router), cfg.router.host, cfg.router.port)
            url = f"http://{cfg.router.host}:{port}/v1"
            print(f"lmdisagg: serving {pipe.router.model_name!r} ({cfg.mode}, {len(workers)} workers) at {url}",
                  flush=True)
            await stop.wait()
            print("lmdisagg: shutting down ...", flush=True)
        finally:
            if runner is not None:
                await runner.cleanup()
            await asyncio.to_thread(pipe.shutdown)

    asyncio.run(main())
    print("lmdisagg: stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(None))
