"""Credential redaction for everything mexp writes or prints: params, config.yaml, tags,
log lines and error messages never carry a password, token or secret.

Pass credentials to a tracking server with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(MLflow reads them from the environment); a URL with `user:password@` still works (MLflow is
given the real URL) but is redacted wherever mexp shows or logs it.
"""
from __future__ import annotations

import logging
import re
import sys
import traceback
from contextlib import contextmanager
from typing import Any

MASK = "***"
# URL userinfo: scheme://user:password@host -> scheme://user:***@host (also user-only tokens).
# The password runs to the last '@' before the host (an unencoded '@' in it is not leaked).
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^/\s:@]*)"
                       r"(?::(?P<pw>[^/\s]*))?@")
# a key that names a secret ends with one of these words: db_password, MLFLOW_TRACKING_TOKEN,
# client_secret, api-key; not n_passes, author, tokenizer
_SECRET_WORD = (r"(?:password|passwd|passphrase|pwd|token|secret|credentials?|"
                r"authorization|auth[_-]?token|(?:secret|api|access|private)[_-]?key)")
# query strings and key=value / key: value / 'key': 'value' text
_KV = re.compile(r"(?i)\b(?P<key>[\w.\-]*?" + _SECRET_WORD + r")(?P<q>['\"]?)"
                 r"(?P<sep>\s*[=:]\s*(?:Basic\s+|Bearer\s+)?['\"]?)(?P<val>[^\s&;,'\"}\]]+)")
_SECRET_KEY = re.compile(r"(?i)(?:^|[_.\-])" + _SECRET_WORD + r"$")


def _userinfo(m: re.Match) -> str:
    if m.group("pw") is None:           # scheme://token@host: the user part may be a token
        return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)
    return f"{m.group('scheme')}{m.group('user')}:{MASK}@"


def redact(text: Any) -> Any:
    """`text` with URL passwords and `secret=value` pairs masked; non-strings pass through."""
    if not isinstance(text, str) or not text:
        return text
    out = _USERINFO.sub(_userinfo, text)
    return _KV.sub(lambda m: f"{m.group('key')}{m.group('q')}{m.group('sep')}{MASK}"
                   if m.group("val") != MASK else m.group(0), out)


def is_secret_key(key: str) -> bool:
    """A config or param key whose value is a secret by its name (password, token...)."""
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact_value(key: str, value: Any) -> Any:
    if is_secret_key(key) and value not in ("", None):
        return MASK
    return redact(value)


def redact_tree(d: Any, key: str = "") -> Any:
    """A nested dict/list copy with every secret masked (by key name or by content)."""
    if isinstance(d, dict):
        return {k: redact_tree(v, f"{key}.{k}" if key else str(k)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(redact_tree(v, key) for v in d)
    return redact_value(key, d) if key else redact(d)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask secrets in a record's message, its exception text and stack (in place)."""
    try:
        msg = record.getMessage()
    except Exception:  # a bad format string: leave it to logging's own error path
        return record
    clean = redact(msg)
    if clean != msg:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if redact(text) != text:        # formatted once here, as Formatter would, but masked
            record.exc_text = redact(text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def install_log_filter() -> None:
    """Mask secrets in every log record of this process, whatever logger or handler it goes
    through (MLflow's own handlers included): records are redacted when they are made, and
    the root handlers also get a filter. Idempotent."""
    old = logging.getLogRecordFactory()
    if not getattr(old, "mexp_redacting", False):
        def factory(*args, **kwargs):
            return redact_record(old(*args, **kwargs))
        factory.mexp_redacting = True
        logging.setLogRecordFactory(factory)
    f = RedactingFilter()
    for h in logging.getLogger().handlers:
        if not any(isinstance(x, RedactingFilter) for x in h.filters):
            h.addFilter(f)


class RedactingStream:
    """A text stream that masks secrets in what is written to it (prints, warnings,
    tracebacks, MLflow's "View run at <url>" lines); everything else is the wrapped stream's."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        return self.stream.write(redact(s) if isinstance(s, str) else s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextmanager
def redacted_output():
    """sys.stdout and sys.stderr mask secrets inside the block (the CLI's whole run)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
