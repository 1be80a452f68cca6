"""The company server: FastAPI app, protocol hosting, replicated status, storage."""

from live.server.app import create_app

__all__ = ["create_app"]
