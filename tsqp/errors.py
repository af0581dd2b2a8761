"""The project's exceptions, and the cleaning of any text a peer sends before it reaches a message.

Only `cli/app.py` turns them into a one-line message and an exit code.
"""

MAX_PEER_TEXT = 500  # characters of a peer's text kept in a message


def clean_text(text: object, limit: int = MAX_PEER_TEXT) -> str:
    """Text fit to show on a terminal: control characters (escape sequences, newlines) replaced by '?', length bounded."""
    cleaned = "".join(c if c.isprintable() else "?" for c in str(text))
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "…"


class TsqpError(Exception):
    """Base class of every error tsqp raises on purpose."""


class ModelLoadError(TsqpError):
    """A model could not be found, read or converted."""


class ProtocolError(TsqpError):
    """A message on the wire is malformed, oversized or not allowed."""


class MalformedReply(ProtocolError):
    """A server's reply is not what was asked: unknown id, wrong tensor count, shape or dtype, non-finite values."""


class RemoteError(TsqpError):
    """The server understood the request and answered with an error."""


class ServerUnavailable(TsqpError):
    """The server did not answer in time, refused the connection or died."""


class ModelMismatch(TsqpError):
    """Client and server hold different models (fingerprints differ)."""


class IntegrityError(TsqpError):
    """A result returned by the untrusted server failed verification."""


class InputError(TsqpError, ValueError):
    """A request the model cannot serve: an empty prompt, or one longer than its context."""


class ContextTooLong(InputError):
    """The prompt plus the tokens asked for do not fit in the model's context."""


class AuthError(TsqpError):
    """CURVE keys are missing, unreadable or malformed, or a peer refused the link's authentication."""


class ShieldError(TsqpError):
    """A shield cannot protect this model as configured (e.g. otp's exactness bound would not hold)."""


class EndpointError(TsqpError):
    """An endpoint is malformed (scheme, host, port), or cannot be bound or connected to."""
