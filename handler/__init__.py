"""The waagent protocol: HandlerEnvironment, settings and status files, sequence numbers, service.

Imports `akvvm_ext`; never the other way round.
"""
from __future__ import annotations
