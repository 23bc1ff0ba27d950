"""Who may use a rollout server: a shared secret, or nobody beyond the server's own host.

A rollout server answers routes that replace the weights the run samples from (`/init_weight_transfer_engine`,
`/update_weights`, `/collective_rpc`), pause or slow it (`/pause`, `/sleep`, `/reset_prefix_cache`) and generate
(`/v1/...`). vLLM's `--api-key` guards only `/v1`, `/v2`, `/inference` and `/cohere`, not its development routes, so
every server of ours puts `RolloutAuthMiddleware` in front of all of them (vLLM's `--middleware` option; our JSON
server asks `authorized` itself):

- with a secret in ALIGNMENT_ROLLOUT_SECRET, every request but `GET /health` must carry `Authorization: Bearer
  <secret>` (vLLM's own header for `--api-key`, so the same client code reaches `/v1`), compared in constant time;
- without one, only clients on the server's own host (loopback) are answered; `alignment rollout serve` refuses to
  listen beyond loopback without a secret.

The trainer's client reads the same variable (`bearer_headers`); the secret never goes into a recipe, a command line
or a log.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os

SECRET_ENV = "ALIGNMENT_ROLLOUT_SECRET"
MIN_SECRET_CHARS = 16
OPEN_PATHS = frozenset({"/health"})  # liveness probes (the trainer's wait for a starting server) need no secret


def rollout_secret() -> str | None:
    """The shared secret from the environment (None when unset or empty)."""
    return os.environ.get(SECRET_ENV) or None


def bearer_headers(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def check_secret(secret: str | None, host: str) -> None:
    """Refuse a server that would answer beyond its host without a secret, or with a guessable one."""
    from alignment.errors import UserError

    if secret is None and not is_loopback(host):
        raise UserError(f"--host {host} reaches beyond this host: set {SECRET_ENV} to a shared secret (e.g. `export "
                        f"{SECRET_ENV}=$(openssl rand -hex 32)`, the same for the trainer) before serving there")
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        raise UserError(f"{SECRET_ENV} has {len(secret)} characters; use at least {MIN_SECRET_CHARS} (e.g. "
                        "`openssl rand -hex 32`)")


def authorized(authorization: str | None, client_host: str | None, secret: str | None) -> bool:
    """Whether a request may pass: the right bearer token when there is a secret, else a client on this host."""
    if secret is None:
        return is_loopback(client_host)
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())


def refusal(secret: str | None) -> tuple[int, dict]:
    """The status and JSON body of a refused request."""
    if secret is None:
        return 403, {"error": f"this rollout server has no secret ({SECRET_ENV}) and answers its own host only"}
    return 401, {"error": f"missing or wrong 'Authorization: Bearer' secret ({SECRET_ENV})"}


class RolloutAuthMiddleware:
    """ASGI middleware for vLLM's OpenAI server (`--middleware rollout.auth.RolloutAuthMiddleware`): vLLM adds it
    outermost, around every route, its development and weight-transfer routes included. The secret is read once, when
    the server builds its middleware stack."""

    def __init__(self, app):
        self.app = app
        self.secret = rollout_secret()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        client = (scope.get("client") or (None,))[0]
        if authorized(authorization, client, self.secret):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        status, payload = refusal(self.secret)
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
