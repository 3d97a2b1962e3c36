"""The worker's exceptions and the process exit codes they map to."""

from __future__ import annotations

# Exit codes follow sysexits(3) so systemd's RestartPreventExitStatus can tell
# "fix the configuration" apart from "the broker went away, try again".
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_UNAVAILABLE = 69
# The worker class's own code failed at start (its __init__ raised): a bug, shown
# with its traceback; unlike 77 and 78 the units restart it.
EXIT_SOFTWARE = 70
EXIT_NOPERM = 77
EXIT_CONFIG = 78


class ChiffonError(Exception):
    """Base class of every error the worker raises on purpose."""

    exit_code = EXIT_FAILED


class ConfigError(ChiffonError):
    """A setting is missing or has a bad value; the message names the setting."""

    exit_code = EXIT_CONFIG


class BrokerAuthError(ChiffonError):
    """The broker refused our credentials or vhost: retrying will not help."""

    exit_code = EXIT_NOPERM


class BrokerUnavailable(ChiffonError):
    """No broker node could be reached (yet)."""

    exit_code = EXIT_UNAVAILABLE


class ConnectionLost(ChiffonError):
    """An established broker connection or channel went away."""

    exit_code = EXIT_UNAVAILABLE


class TopologyMismatch(ChiffonError):
    """A queue or exchange exists with other arguments than ours: no retry helps.

    Exits 78 like a configuration error: either the declarations are aligned
    or the worker is told not to declare (CHIFFON_DECLARE_TOPOLOGY=false).
    `fields` name the queue, the argument and both values for the log line.
    """

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, fields: dict[str, str]) -> None:
        super().__init__(message)
        self.fields = fields


class TopologyUnavailable(ChiffonError):
    """A queue or exchange we need is missing, or its node is down: checked again later."""

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, fields: dict[str, str]) -> None:
        super().__init__(message)
        self.fields = fields


class PublishFailed(ChiffonError):
    """The broker did not confirm a message (nacked or unroutable)."""


class InvalidMessage(ChiffonError):
    """A delivery does not follow the protocol; it is dead-lettered."""

    def __init__(self, reason: str, ids: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        # trace_id/request_id/from_agent when they could be read, so an error
        # reply can still reach whoever sent the broken message.
        self.ids = ids or {}
