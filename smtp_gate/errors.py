"""The domain exceptions: caught once at the top of the CLI and printed as one line."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smtp_gate.offswitch import Disabled


class SmtpGateError(Exception):
    """An error the operator can act on; its message quotes the bad value and what was expected."""


class ConfigError(SmtpGateError):
    """A bad configuration file, line or value."""


class ValidationError(SmtpGateError):
    """A value from outside (interface name, MAC, port) that may not reach nft."""


class NftError(SmtpGateError):
    """nft refused a batch; nothing of it was applied (nft batches are atomic)."""


class WhitelistError(SmtpGateError):
    """The whitelist file cannot be read or written, or a value cannot be stored in it."""


class LockTimeout(SmtpGateError):
    """Another smtp-gate process held the lock longer than we may wait."""


class DeadlineExceeded(SmtpGateError):
    """A hook used up its time budget (hook.DEADLINE) before a step it had to do."""


class DomainXMLError(SmtpGateError):
    """A domain XML we cannot read: not XML, or missing the <name>/<uuid> every guest has."""


class EnforcementDisabled(SmtpGateError):
    """The operator switched enforcement off (`smtp-gate disable`): nothing unattended installs it."""

    def __init__(self, off: "Disabled") -> None:
        super().__init__(f"{off.describe()}: not installing (`smtp-gate enable` turns it back on)")
        self.off = off


class RunStateError(SmtpGateError):
    """The run directory (records, journal) cannot be written; the kernel change that needed
    recording was undone, so nothing was changed."""


class PartialChange(SmtpGateError):
    """A change was made only in part: a file was written, the kernel then refused the change,
    and the file could not be restored; or the kernel took a change its record could not be
    written for, and undoing it failed.  The message says exactly what is left.  Its own
    exit code (6), since exit 1 promises that nothing was changed."""
