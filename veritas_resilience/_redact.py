"""Redaction of secrets (passwords in DSNs, URLs and key=value strings) before anything is shown."""

from __future__ import annotations

import re

__all__ = ["redact"]

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@")
# password=secret, "password": "secret", passwd 'secret', auth_pass=...
_KV_PASSWORD = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|pass|auth_pass|requirepass|masterauth)\b['\"]?\s*[=:]\s*)"
    # An unquoted value ends before a delimiter, leaving out one quote just before it: the quote
    # that closes an enclosing string ("dsn='... password=abc'") is kept, not masked away.
    r"(?P<pw>'[^']*'|\"[^\"]*\"|[^\s,;&)}]*?(?=['\"]?(?:[\s,;&)}]|$)))",
    re.IGNORECASE,
)
# Redis config lines and commands: "requirepass s3cret", "sentinel auth-pass mymaster s3cret"
_CONF_PASSWORD = re.compile(
    r"(?P<key>\b(?:requirepass|masterauth)\s+|\bauth-pass\s+\S+\s+)(?P<pw>[^\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Return ``text`` with every password in a URL, DSN or ``key=value`` pair replaced by ``***``.

    Examples:
        >>> redact("postgresql://app:s3cret@db1:5432/app")
        'postgresql://app:***@db1:5432/app'
        >>> redact("host=db1 password=s3cret user=app")
        'host=db1 password=*** user=app'
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}***@", text)
    text = _CONF_PASSWORD.sub(lambda m: f"{m['key']}***", text)
    return _KV_PASSWORD.sub(_mask_value, text)


def _mask_value(match: re.Match[str]) -> str:
    value = match["pw"]
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match['key']}{quote}***{quote}"
