"""The status blob the agent would upload to Azure, parsed into views a test reads. No I/O.

The blob is what the real `StatusBlob` serialises after `report_ext_handlers_status()` has read
the extensions' status files with `collect_ext_status`/`parse_ext_status`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TERMINAL = ("success", "error")


@dataclass(frozen=True)
class SubstatusView:
    name: str | None
    status: str
    code: int
    message: str | None


@dataclass(frozen=True)
class ExtensionView:
    """The extension's status as the agent parsed it from `status/<seq>.status`."""

    name: str
    seq: int
    status: str
    code: int
    message: str | None
    operation: str | None
    substatus: tuple[SubstatusView, ...]


@dataclass(frozen=True)
class HandlerView:
    """One handler in the status blob: Ready/NotReady plus the extension status, if any."""

    name: str
    version: str
    status: str
    code: int
    message: str | None
    extension: ExtensionView | None

    @property
    def terminal(self) -> bool:
        return self.extension is not None and self.extension.status in TERMINAL


@dataclass(frozen=True)
class AgentReport:
    """The status blob the agent would upload to Azure, parsed; `blob` is the raw JSON."""

    handlers: tuple[HandlerView, ...]
    goal_state_status: str | None
    blob: Mapping[str, Any]

    def handler(self, name: str) -> HandlerView:
        for handler in self.handlers:
            if handler.name == name:
                return handler
        raise KeyError(f"no status for {name}; reported: {[h.name for h in self.handlers]}")

    @property
    def converged(self) -> bool:
        """Every handler settled, by the rule of the agent's ExtensionsSummary (ga/update.py)."""
        settled = (*TERMINAL, "Ready", "NotReady")
        return all((h.extension.status if h.extension else h.status) in settled
                   for h in self.handlers)

    @classmethod
    def from_blob(cls, blob: Mapping[str, Any]) -> AgentReport:
        aggregate = blob["aggregateStatus"]
        gs = aggregate.get("vmArtifactsAggregateStatus", {}).get("goalStateAggregateStatus")
        handlers = tuple(_handler_view(h) for h in aggregate["handlerAggregateStatus"])
        return cls(handlers, gs["status"] if gs else None, blob)


def _message(node: Mapping[str, Any]) -> str | None:
    formatted = node.get("formattedMessage")
    return None if formatted is None else formatted.get("message")


def _handler_view(node: Mapping[str, Any]) -> HandlerView:
    runtime = node.get("runtimeSettingsStatus")
    extension = None
    if runtime is not None:
        status = runtime["settingsStatus"]["status"]
        subs = tuple(SubstatusView(s.get("name"), s["status"], s.get("code", 0), _message(s))
                     for s in status.get("substatus", []))
        extension = ExtensionView(status["name"], int(runtime["sequenceNumber"]), status["status"],
                                  status.get("code", 0), _message(status), status.get("operation"),
                                  subs)
    return HandlerView(node["handlerName"], node["handlerVersion"], node["status"],
                       node.get("code", 0), _message(node), extension)
