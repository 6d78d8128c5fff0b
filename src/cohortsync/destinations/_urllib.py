"""
:class:`UrllibTransport`: :class:`WebhookDestination`'s default transport,
over :mod:`urllib.request`. A module of its own so that only hosts that post
through it load urllib.request and http.client (about 3 MB).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from http.client import HTTPException, HTTPMessage
from typing import IO

from typing_extensions import override

from cohortsync.destinations._webhook import HttpResponse, _describe, require_http, safe_url
from cohortsync.exceptions import TransientError

__all__ = ["UrllibTransport"]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    @override
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> None:
        # urllib would re-send a POST as a bodiless GET, with our Authorization
        # header, to wherever the server points: surface the 3xx instead.
        return


class UrllibTransport:
    """
    The default transport: :mod:`urllib.request`, no dependencies.

    ``timeout`` bounds connecting and each read, as in :mod:`socket`. Proxies
    come from the usual environment variables; redirects are not followed.
    """

    def __init__(self) -> None:
        self._opener = urllib.request.build_opener(_NoRedirects())

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST with :mod:`urllib.request`; 4xx and 5xx answers are returned,
        not raised, so the destination alone decides what each status means.

        Raises:
            ConfigurationError: The URL is not http or https (urllib would
                also open ``file:`` URLs).
            TransientError: No answer came (refused, reset, timed out).
        """
        require_http(url)
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 - scheme checked just above
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return HttpResponse(
                    response.status, dict(response.headers.items()), response.read()
                )
        except urllib.error.HTTPError as e:
            try:
                error_body = e.read()
            except (OSError, HTTPException):
                error_body = b""
            finally:
                e.close()
            return HttpResponse(e.code, dict(e.headers.items()) if e.headers else {}, error_body)
        except urllib.error.URLError as e:
            raise TransientError(f"POST to {safe_url(url)} failed: {_describe(e.reason)}") from e
        except (OSError, HTTPException) as e:
            raise TransientError(f"POST to {safe_url(url)} failed: {_describe(e)}") from e

    def __repr__(self) -> str:
        return "UrllibTransport()"
