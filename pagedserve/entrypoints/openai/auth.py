"""--api-key: every /v1 and /v2 path, and /classify, /score and /rerank, needs `Authorization:
Bearer <key>` (as vLLM: /health, /metrics, /version and /tokenize stay open; vLLM leaves
/classify, /score and /rerank open too, but they run the model). Checked in middleware, from the headers alone, so a client
without the key gets 401 before its body is read or validated (no parsing work, no schema
hints), and unknown /v1 paths are not told apart from real ones."""

from __future__ import annotations

import hmac
from typing import Optional

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.requests import HTTPConnection

from pagedserve.entrypoints.openai.dev_routes import DEV_PATHS

# (and dev_routes.py's, PAGEDSERVE_SERVER_DEV_MODE: they reshape the server)
PROTECTED_PREFIXES = ("/v1", "/v2", "/classify", "/score", "/rerank", "/invocations") + DEV_PATHS


class ApiKeyBackend(AuthenticationBackend):
    def __init__(self, api_key: str) -> None:
        self._expected = api_key.encode()

    async def authenticate(self, conn: HTTPConnection) -> Optional[tuple[AuthCredentials, SimpleUser]]:
        path = conn.url.path
        if not any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES):
            return None
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not reveal how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self._expected):
            raise AuthenticationError("Unauthorized: a valid API key is required (Authorization: Bearer <key>).")
        return AuthCredentials(["api_key"]), SimpleUser("api_key")
