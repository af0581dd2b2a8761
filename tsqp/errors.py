"""The project's exceptions. Only `cli.py` turns them into a one-line message and an exit code."""


class TsqpError(Exception):
    """Base class of every error tsqp raises on purpose."""


class ModelLoadError(TsqpError):
    """A model could not be found, read or converted."""


class ProtocolError(TsqpError):
    """A message on the wire is malformed, oversized or not allowed."""


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


class AuthError(TsqpError):
    """CURVE keys are missing, unreadable or malformed, or a peer refused the link's authentication."""


class ShieldError(TsqpError):
    """A shield cannot protect this model as configured (e.g. otp's exactness bound would not hold)."""


class EndpointError(TsqpError):
    """An endpoint is malformed (scheme, host, port), or cannot be bound or connected to."""
