"""Fixtures of the unit tests."""

from __future__ import annotations

from s3_fixtures import s3_bucket, s3_server

__all__ = ["s3_bucket", "s3_server"]
