"""How the server meets the web, with vLLM's `serve` flags: CORS (browsers calling the API
from another origin; allowed from anywhere by default, as vLLM's), TLS (uvicorn's own),
X-Request-Id response headers, the FastAPI docs pages, and server load tracking (GET /load)."""

from __future__ import annotations

import argparse
import json
import ssl
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # the CLI reads the flags where FastAPI may be absent (a GPU machine's `generate`)
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _json_list(value: str) -> list[str]:
    try:
        out = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(out, list) or not all(isinstance(v, str) for v in out):
        raise argparse.ArgumentTypeError('expected a JSON list of strings, e.g. \'["https://example.com"]\'')
    return out


@dataclass(frozen=True)
class HttpOptions:
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    ssl_keyfile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_ca_certs: Optional[str] = None
    ssl_cert_reqs: int = int(ssl.CERT_NONE)
    enable_request_id_headers: bool = False
    disable_fastapi_docs: bool = False
    enable_server_load_tracking: bool = False

    def __post_init__(self) -> None:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together: TLS needs both.")
        if self.ssl_cert_reqs not in (int(ssl.CERT_NONE), int(ssl.CERT_OPTIONAL), int(ssl.CERT_REQUIRED)):
            raise ValueError(f"--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), got "
                             f"{self.ssl_cert_reqs}.")
        if self.allow_credentials and "*" in self.allowed_origins:
            # Browsers refuse credentials for "*": name the origins instead.
            raise ValueError("--allow-credentials needs --allowed-origins to name the origins, not '*'.")

    @staticmethod
    def add_cli_args(g: Any) -> None:
        g.add_argument("--allowed-origins", type=_json_list, default=["*"],
                       help='origins a browser may call the API from (CORS), JSON (default: \'["*"]\', any)')
        g.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: allowed methods, JSON")
        g.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: allowed headers, JSON")
        g.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and credentials")
        g.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key file")
        g.add_argument("--ssl-certfile", default=None, help="and this certificate file")
        g.add_argument("--ssl-ca-certs", default=None, help="CA certificates to check client certificates with")
        g.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                       help="client certificates: 0 not asked for, 1 optional, 2 required")
        g.add_argument("--enable-request-id-headers", action="store_true",
                       help="answer every request with an X-Request-Id header (the client's own, or a new one)")
        g.add_argument("--disable-fastapi-docs", action="store_true",
                       help="no /docs, /redoc or /openapi.json pages")
        g.add_argument("--enable-server-load-tracking", action="store_true",
                       help="GET /load answers {\"server_load\": API requests in flight}, for a load balancer")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HttpOptions":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})

    def fastapi_kwargs(self) -> dict[str, Any]:
        return dict(docs_url=None, redoc_url=None, openapi_url=None) if self.disable_fastapi_docs else {}

    def add_middleware(self, app: "FastAPI") -> None:
        """Added last, so outermost: a browser's preflight is answered, and a refusal (401, 413)
        carries the CORS and request-id headers that let its page read it."""
        from starlette.middleware.cors import CORSMiddleware

        if self.enable_server_load_tracking:
            tracker = LoadTracker()
            app.state.server_load = tracker
            app.add_api_route("/load", tracker.report, methods=["GET"])
            app.add_middleware(LoadTrackingMiddleware, tracker=tracker)
        if self.enable_request_id_headers:
            app.add_middleware(RequestIdMiddleware)
        app.add_middleware(CORSMiddleware, allow_origins=self.allowed_origins, allow_methods=self.allowed_methods,
                           allow_headers=self.allowed_headers, allow_credentials=self.allow_credentials)

    def uvicorn_kwargs(self) -> dict[str, Any]:
        return dict(ssl_keyfile=self.ssl_keyfile, ssl_certfile=self.ssl_certfile, ssl_ca_certs=self.ssl_ca_certs,
                    ssl_cert_reqs=self.ssl_cert_reqs)


class RequestIdMiddleware:
    """X-Request-Id on every HTTP response: the request's own header if it has one (a proxy's
    trace id), else a fresh one. Pure ASGI, so streams pass through unbuffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        rid = given if given and len(given) <= 256 else uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class LoadTracker:
    """API requests in flight (a stream counts until its last byte is sent)."""

    def __init__(self) -> None:
        self.in_flight = 0

    async def report(self) -> dict[str, int]:
        return {"server_load": self.in_flight}


class LoadTrackingMiddleware:
    def __init__(self, app: ASGIApp, tracker: LoadTracker) -> None:
        from pagedserve.entrypoints.openai.auth import PROTECTED_PREFIXES

        self.app = app
        self.tracker = tracker
        self.prefixes = PROTECTED_PREFIXES  # the API's routes, not /health, /metrics or /load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not any(path == p or path.startswith(p + "/") for p in self.prefixes):
            await self.app(scope, receive, send)
            return
        self.tracker.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.tracker.in_flight -= 1
