"""Logging to stderr in the foreground and to syslog as a daemon."""

from __future__ import annotations

import logging
import os
import sys
import syslog

IDENT = "virtfs-proxy-helper"

_SYSLOG_PRIORITIES = {
    logging.CRITICAL: syslog.LOG_CRIT,
    logging.ERROR: syslog.LOG_ERR,
    logging.WARNING: syslog.LOG_WARNING,
    logging.INFO: syslog.LOG_INFO,
    logging.DEBUG: syslog.LOG_DEBUG,
}


def _syslog_priority(levelno: int) -> int:
    for level, priority in _SYSLOG_PRIORITIES.items():
        if levelno >= level:
            return priority
    return syslog.LOG_DEBUG


class SyslogHandler(logging.Handler):
    """Sends records through the C library's syslog(3).

    openlog with LOG_NDELAY connects to /dev/log at once, before chroot
    makes that socket unreachable, and the connection is kept from then on.
    """

    def __init__(self) -> None:
        super().__init__()
        syslog.openlog(IDENT, syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            syslog.syslog(_syslog_priority(record.levelno), message)
        except Exception:
            self.handleError(record)


class JournalPrefixFormatter(logging.Formatter):
    """Prefixes each line with "<N>" so journald records its syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_syslog_priority(record.levelno)}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to "device:inode" of the stream it connected.
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure(foreground: bool, level: int) -> None:
    """Send log records to stderr (foreground) or syslog (daemon)."""
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        if _stderr_is_journal():
            handler.setFormatter(JournalPrefixFormatter("%(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter(f"{IDENT}[%(process)d]: %(levelname)s: %(message)s")
            )
    else:
        handler = SyslogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
