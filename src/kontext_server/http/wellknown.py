"""``GET /.well-known/jwks.json``: the public keys that verify this server's webhooks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kontext_server.webhooks.signing import WebhookSigner

__all__ = ["wellknown_router"]


def wellknown_router() -> APIRouter:
    router = APIRouter(tags=["webhooks"])
    router.add_api_route("/.well-known/jwks.json", jwks, methods=["GET"])
    return router


def jwks(request: Request) -> dict[str, Any]:
    """JWKS of the Ed25519 key that signs webhooks (PROTOCOL.md §9)."""
    signer: WebhookSigner = request.app.state.services.signer
    return signer.jwks()
