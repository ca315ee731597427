"""``tunelab board``: parse flags, check the port, run the web app (``tunelab.board``)."""

import errno
import logging
import socket
from pathlib import Path

from tunelab.cli.data import _Parser
from tunelab.errors import UsageError

log = logging.getLogger("tunelab")


def cmd_board(argv: list[str]) -> int:
    parser = _Parser(prog="tunelab board", description="A local web page to launch runs, watch their curves, chat with the result and compare runs.")
    parser.add_argument("--runs-dir", default="runs", help="the folder runs are launched into and read from (default runs)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="the port (default 7860; one in use is refused with what to do)")
    parser.add_argument("--registry-url", help="list this registry's versions in Compare (default $TUNELAB_REGISTRY_URL; none: no registry)")
    args = parser.parse_args([a for a in argv if a != "--debug"])
    import os

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("tunelab board needs FastAPI and uvicorn: pip install 'tunelab[board]'.") from None
    from tunelab.board import ChatServers, RunBook, create_app

    check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("The board on %s can be reached from other machines, and it starts training runs: anyone who reaches it can.", args.host)
    runs = RunBook(Path(args.runs_dir))
    app = create_app(runs, ChatServers(), args.registry_url or os.environ.get("TUNELAB_REGISTRY_URL"))
    print(f"tunelab board on http://{args.host}:{args.port}/ (runs in {Path(args.runs_dir).resolve()}); Ctrl-C stops the board, not its runs.")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds, with what to do, before the app starts."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UsageError(f"Port {port} on {host} is already in use (another board, or another program): "
                                 f"pass --port N for a free one, or stop what holds it.") from None  # fmt: skip
            raise UsageError(f"Cannot listen on {host}:{port}: {err.strerror}. Pass --host 127.0.0.1 or another --port.") from None
