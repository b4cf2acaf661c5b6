"""CORS as vLLM serves it (Starlette's CORSMiddleware under --allowed-origins, --allowed-methods,
--allowed-headers and --allow-credentials): a preflight is answered before any route, and a
response to an allowed origin says so.

A browser asks first (OPTIONS with Origin and Access-Control-Request-Method) and sends the real
request only if the answer allows it; other clients never look at these headers.
"""
from __future__ import annotations

from collections.abc import Mapping

# What "*" stands for in --allowed-methods (Starlette's list).
ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Headers a browser sends without asking (the Fetch standard's CORS-safelisted request headers).
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


class Cors:
    def __init__(self, origins: tuple[str, ...], methods: tuple[str, ...], headers: tuple[str, ...],
                 credentials: bool):
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.methods = ALL_METHODS if "*" in methods else tuple(dict.fromkeys(m.upper() for m in methods))
        self.any_header = "*" in headers
        self.headers = SAFELISTED_HEADERS | {h.lower() for h in headers}
        self.credentials = credentials

    @staticmethod
    def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
        return method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers

    def allows_origin(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def _origin_headers(self, origin: str) -> dict[str, str]:
        # With credentials a browser refuses "*": the origin itself is named, and caches must key on it.
        if self.any_origin and not self.credentials:
            return {"Access-Control-Allow-Origin": "*"}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """The CORS headers of an actual (not preflight) response: none unless the origin is allowed.
        X-Request-ID is exposed, so that a page's script can read it."""
        if not origin or not self.allows_origin(origin):
            return {}
        return {**self._origin_headers(origin), "Access-Control-Expose-Headers": "X-Request-ID"}

    def preflight(self, headers: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
        """The headers answering a preflight, and why it is refused (None: allowed)."""
        origin = headers["origin"]
        method = headers["access-control-request-method"]
        asked = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
        answer = {"Access-Control-Allow-Methods": ", ".join(self.methods), "Access-Control-Max-Age": MAX_AGE}
        if self.any_header:  # echo what was asked: "*" is no wildcard for Authorization
            if asked:
                answer["Access-Control-Allow-Headers"] = ", ".join(asked)
        else:
            answer["Access-Control-Allow-Headers"] = ", ".join(sorted(self.headers))
        refusals = []
        if self.allows_origin(origin):
            answer.update(self._origin_headers(origin))
        else:
            refusals.append(f"origin {origin!r} is not allowed (--allowed-origins)")
        if method.upper() not in self.methods:
            refusals.append(f"method {method!r} is not allowed (--allowed-methods)")
        refused_headers = [h for h in asked if h not in self.headers and not self.any_header]
        if refused_headers:
            refusals.append(f"header {refused_headers[0]!r} is not allowed (--allowed-headers)")
        return answer, ("CORS preflight refused: " + "; ".join(refusals)) if refusals else None
