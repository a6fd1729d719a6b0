"""The engine's error hierarchy: a short code, a sentence a user reads, an optional hint.

No I/O. `str(err)` never carries a secret value, a private key or a token.
"""
from __future__ import annotations


class AkvvmError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "AKVVM"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


class SettingsError(AkvvmError):
    """The settings are invalid; `problems` lists every one of them."""

    code = "SETTINGS"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems) or "invalid settings")
        self.problems = problems


class ContentError(AkvvmError):
    """A secret's value is not a usable certificate (garbage, no key, chain loop...)."""

    code = "CONTENT"


class FetchError(AkvvmError):
    """Key Vault or the identity endpoint could not give us the secret.

    `retryable` is true for throttling, 5xx, timeouts and resets; `retry_after` carries a
    server-given delay in seconds when there was one; `status` is the HTTP status or 0.
    """

    code = "FETCH"

    def __init__(
        self,
        message: str,
        hint: str = "",
        *,
        status: int = 0,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class StoreError(AkvvmError):
    """The store could not be written (disk full, read-only, path is a file, planted link)."""

    code = "STORE"


class AclError(AkvvmError):
    """An ACL could not be applied (unknown user or group, filesystem without ACLs)."""

    code = "ACL"
