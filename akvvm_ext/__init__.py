"""The certificate-sync engine of the Key Vault VM extension for Linux.

Knows nothing of waagent: settings in, certificates on disk and results out.
"""
from __future__ import annotations

__version__ = "3.1.0"
