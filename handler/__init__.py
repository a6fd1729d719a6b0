"""The waagent protocol: HandlerEnvironment, settings files, sequence numbers, status files, service.

Imports `akvvm_ext`; never the other way round.
"""
from __future__ import annotations
