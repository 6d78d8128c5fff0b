"""
PostgreSQL connection strings without the driver: telling one from a file
path, and hiding its password in anything shown (messages, ``repr``, the
command line's errors).

Kept apart from :mod:`cohortsync.storage._postgres` so that code which must
mask or recognise a DSN (the command line, before it knows whether psycopg is
installed) never imports psycopg.
"""

from __future__ import annotations

import re

__all__ = ["POSTGRES_SCHEMES", "is_keyword_dsn", "mask_dsn", "mask_secrets", "url_scheme"]

POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})
"""The URL schemes libpq accepts."""

_SCHEME = re.compile(r"^\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")

# A URL's password runs from the ":" after the user name to the "@" before the
# host. libpq stops at the first "@"; a password typed with a raw "@" in it
# (instead of %40) would then show its tail, so the mask runs to the last "@"
# before the path: it may hide part of a host, never part of a password.
_URL_USERINFO = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s/]*@")
# A mistyped PostgreSQL URL (postgresql:/u:pw@h, postgres//u:pw@h) is no URL,
# so the rule above misses it, and the CLI takes it for a file name: its
# password must not show in "no such file" either.
_LOOSE_USERINFO = re.compile(
    r"(?P<pre>\bpostgres(?:ql)?[^\s/]*?[:/]+[^\s:/@]*:)(?!\*\*\*@)[^\s/@]*@", re.IGNORECASE
)
# A value already masked ("***" before a quote, a space or the end) is left as it
# is, so masking a message that quotes a masked DSN changes nothing.
_MASKED = r"\*\*\*(?=['\s&#]|$)"
_URL_QUERY_PASSWORD = re.compile(
    rf"(?P<pre>[?&](?:ssl)?password=)(?:{_MASKED}|[^&#\s]*)", re.IGNORECASE
)
_KV_PASSWORD = re.compile(
    rf"(?P<pre>\b(?:ssl)?password\s*=\s*)(?:{_MASKED}|'(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE
)

# The connection parameters libpq knows (PostgreSQL 17). A string that starts
# with one of them followed by "=" is a key=value connection string: no one
# names a database file "host=db dbname=app".
_KEYWORDS = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "dbname",
        "fallback_application_name",
        "gssdelegation",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "options",
        "passfile",
        "password",
        "port",
        "replication",
        "require_auth",
        "requirepeer",
        "requiressl",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcertmode",
        "sslcompression",
        "sslcrl",
        "sslcrldir",
        "sslkey",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "target_session_attrs",
        "tcp_user_timeout",
        "user",
    }
)
_FIRST_KEY = re.compile(r"^\s*(?P<key>[A-Za-z_]+)\s*=")


def mask_dsn(dsn: str) -> str:
    """
    Return *dsn* (a URL or a ``key=value`` connection string) with its password
    replaced by ``***``, for messages and ``repr``.
    """
    if "://" in dsn:
        masked = _URL_USERINFO.sub(r"\g<pre>***@", dsn)
        return _URL_QUERY_PASSWORD.sub(r"\g<pre>***", masked)
    return _KV_PASSWORD.sub(r"\g<pre>***", dsn)


def mask_secrets(text: str) -> str:
    """
    Return *text* (a message that may quote connection strings anywhere in
    it, as argparse's "unrecognized arguments: ..." does) with every URL
    password and every ``password=`` value replaced by ``***``.
    """
    masked = _URL_USERINFO.sub(r"\g<pre>***@", text)
    masked = _LOOSE_USERINFO.sub(r"\g<pre>***@", masked)
    masked = _URL_QUERY_PASSWORD.sub(r"\g<pre>***", masked)
    return _KV_PASSWORD.sub(r"\g<pre>***", masked)


def url_scheme(text: str) -> str | None:
    """
    The scheme of *text* when it is a URL (``postgresql://...``), else ``None``.
    """
    match = _SCHEME.match(text)
    return None if match is None else match["scheme"].lower()


def is_keyword_dsn(text: str) -> bool:
    """
    Whether *text* is a libpq ``key=value`` connection string: it starts
    with a parameter libpq knows, then ``=`` (``host=db dbname=app``).
    """
    match = _FIRST_KEY.match(text)
    return match is not None and match["key"].lower() in _KEYWORDS
