"""``tunelab board``: a local web app to launch runs, watch their curves, chat with the base and
the trained model side by side, and compare runs (``app.create_app``)."""

from tunelab.board.app import create_app
from tunelab.board.chat import ChatServers
from tunelab.board.runs import RunBook

__all__ = ["ChatServers", "RunBook", "create_app"]
