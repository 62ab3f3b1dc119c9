"""A local OpenAI-compatible server with fault injection, for tests and benchmarks (needs
the ``dev`` extra). Kept out of the installed package: users never import it."""

from openai_server.faults import FaultSchedule, TrafficLog
from openai_server.server import ChatHandler, RunningServer, serve

__all__ = ["ChatHandler", "FaultSchedule", "RunningServer", "TrafficLog", "serve"]
