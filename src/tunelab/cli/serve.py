"""``tunelab serve``: parse flags, load the model, run the HTTP server (``tunelab.deploy.server``)."""

import logging
import os

from tunelab.cli.data import _Parser

log = logging.getLogger("tunelab")


def cmd_serve(argv: list[str]) -> int:
    parser = _Parser(prog="tunelab serve", description="Serve a model and its adapters behind an OpenAI-compatible API.")
    parser.add_argument("--model", required=True, help="model folder, .gguf, run folder or shipped pool name (smollm2-135m, tiny-llama)")
    parser.add_argument("--name", help="the base's name in requests' model field (default: the --model argument's last part)")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PATH: an adapter loaded at start (repeatable)")
    parser.add_argument("--adapter-dir", action="append", default=[], help="a folder POST /v1/adapters may load adapters from (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"), help="require Authorization: Bearer KEY (default $TUNELAB_API_KEY)")
    parser.add_argument("--route", action="append", default=[],
                        help="NAME=VARIANT:WEIGHT,VARIANT:WEIGHT: requests for NAME split between variants by weight, sticky per user (repeatable)")
    parser.add_argument("--ab-log", metavar="FILE",
                        help="write every answer of a --route name (variant, tokens, latency) and every POST /v1/feedback to this JSON lines "
                             "file, for tunelab eval ab FILE --where route=NAME --outcome latency_s|outcome")  # fmt: skip
    parser.add_argument("--registry-url", help="serve registry references (NAME@production, NAME@staging, NAME@3) from this registry")
    parser.add_argument("--device", help="cpu, cuda (default: cuda when there is one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--mixed-lora", default="stacked", choices=("stacked", "peft"),
                        help="rows for different LoRA adapters in one batch: tunelab's stacked update (default) or peft's mixed-adapter batches")
    group = parser.add_argument_group("limits")
    group.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    group.add_argument("--queue-size", type=int, default=64, help="requests waiting before the server answers 503")
    group.add_argument("--max-resident", type=int, default=4, help="adapters in memory at once (least recently used unloaded)")
    group.add_argument("--max-prompt-tokens", type=int, default=2048)
    group.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    group.add_argument("--max-body-bytes", type=int, default=1 << 20)
    group.add_argument("--request-seconds", type=float, default=300.0)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    import uvicorn

    from tunelab.deploy.server import Limits, ModelServer, create_app, parse_adapters, parse_routes
    from tunelab.errors import UsageError
    from tunelab.evaluation.models import load_eval_model

    for flag in ("max_batch", "queue_size", "max_resident", "max_prompt_tokens", "max_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1.")
    adapters = parse_adapters(args.adapter)
    limits = Limits(args.max_batch, args.queue_size, args.max_prompt_tokens, args.max_tokens, args.max_body_bytes, args.max_resident, args.request_seconds)
    registry = None
    if args.registry_url:
        from tunelab.deploy.registry import Registry

        registry = Registry(args.registry_url)
    server = ModelServer(load_eval_model(args.model, dtype=args.dtype, device=args.device), adapters, args.adapter_dir, limits,
                         name=args.name or args.model.rstrip("/").split("/")[-1], registry=registry, routes=parse_routes(args.route), ab_log=args.ab_log, mixed_lora=args.mixed_lora)  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("Serving on %s without an API key: anyone who reaches this address can use the models (set --api-key).", args.host)
    log.info("Serving %s on http://%s:%d/v1", ", ".join(server.models()), args.host, args.port)
    uvicorn.run(create_app(server, args.api_key), host=args.host, port=args.port, log_level="warning")
    return 0
