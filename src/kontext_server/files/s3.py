"""``S3FileStore``: output images in an S3-compatible bucket, handed out as presigned links.

Chosen with ``--files s3://bucket/prefix``; the endpoint, region, credentials, addressing
style and link expiry come from ``Settings`` (``s3_*``). Workers upload with ``put``; an API
process signs a fresh GET link each time a result is read (``url``), so links in results
expire (``s3_presign_expiry_s``) but a result read again gets a new one. Signing is local
computation: reading a result costs no request to S3.

Errors are mapped where they leave this module: a bucket that cannot be used when the store
is opened raises ``ConfigError`` saying what to fix; a failed upload, download or delete
raises ``OSError`` (like a full disk in ``LocalFileStore``), chained to botocore's error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from kontext_server.config import Settings
from kontext_server.domain.errors import ConfigError
from kontext_server.files.base import StoredFile, is_valid_file_key

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3FileStore", "S3Location", "make_s3_client", "open_s3_file_store", "parse_s3_url"]

MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4 refuses longer links
_CACHE_FOREVER = "public, max-age=31536000, immutable"  # keys are never reused
_MAX_ATTEMPTS = 5  # per request, connection errors and 5xx/throttling included
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 60.0
# AWS's rules, loosely: 3-63 lowercase letters, digits, dots and hyphens.
_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MISSING_BUCKET_CODES = {"404", "NoSuchBucket", "NotFound"}
_DENIED_CODES = {
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}
_WRONG_REGION_CODES = {"301", "PermanentRedirect", "AuthorizationHeaderMalformed"}
_MISSING_KEY_CODES = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where files go: ``bucket`` and a key ``prefix`` without slashes at either end."""

    bucket: str
    prefix: str


class S3FileStore:
    """Files as objects ``{prefix}/{key}`` in ``bucket``. Thread-safe (boto3 clients are).

    Keys must pass ``is_valid_file_key``: ``put``, ``url`` and ``delete`` raise
    ``ValueError`` for others; ``read`` (which may see keys from URLs) answers ``None``.
    Build one with ``open_s3_file_store``, which also checks that the bucket is usable.
    """

    def __init__(self, client: S3Client, location: S3Location, *, presign_expiry_s: int) -> None:
        self._client = client
        self._location = location
        self._presign_expiry_s = _checked_expiry_s(presign_expiry_s)

    @property
    def location(self) -> S3Location:
        return self._location

    def put(self, key: str, data: bytes, content_type: str) -> StoredFile:
        object_key = self._object_key(key)
        try:
            self._client.put_object(
                Bucket=self._location.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                CacheControl=_CACHE_FOREVER,
            )
        except (BotoCoreError, ClientError) as exc:
            self._raise_io_error("upload", object_key, exc)
        return StoredFile(key=key, size=len(data), content_type=content_type)

    def url(self, key: str, base_url: str) -> str:
        """A presigned GET link, valid ``presign_expiry_s`` from now; ``base_url`` is unused
        (clients fetch from the bucket's endpoint, which must be reachable by them)."""
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._location.bucket, "Key": self._object_key(key)},
            ExpiresIn=self._presign_expiry_s,
        )

    def read(self, key: str) -> bytes | None:
        """The object's bytes; ``None`` when the key is not valid or there is no object."""
        if not is_valid_file_key(key):
            return None
        object_key = self._object_key(key)
        try:
            response = self._client.get_object(Bucket=self._location.bucket, Key=object_key)
            with response["Body"] as body:
                return body.read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_KEY_CODES:
                return None
            self._raise_io_error("download", object_key, exc)
        except BotoCoreError as exc:
            self._raise_io_error("download", object_key, exc)

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing one is not an error (S3 answers 204)."""
        object_key = self._object_key(key)
        try:
            self._client.delete_object(Bucket=self._location.bucket, Key=object_key)
        except (BotoCoreError, ClientError) as exc:
            self._raise_io_error("delete", object_key, exc)

    def verify_bucket(self) -> None:
        """One ``HeadBucket``: raises ``ConfigError`` saying what to fix when the bucket is
        missing, the credentials are refused or absent, or the endpoint cannot be reached."""
        try:
            self._client.head_bucket(Bucket=self._location.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ConfigError(self._unusable_bucket_message(exc)) from exc

    def _object_key(self, key: str) -> str:
        if not is_valid_file_key(key):
            raise ValueError(
                f"file key {key!r} is not allowed: use '/'-separated segments of letters,"
                " digits, '-', '_' and '.', none starting with '.', at most 512 characters"
            )
        return f"{self._location.prefix}/{key}" if self._location.prefix else key

    def _raise_io_error(self, action: str, object_key: str, exc: Exception) -> NoReturn:
        where = f"s3://{self._location.bucket}/{object_key}"
        raise OSError(f"S3 {action} of {where} failed: {exc}") from exc

    def _unusable_bucket_message(self, exc: Exception) -> str:
        bucket = self._location.bucket
        endpoint = self._client.meta.endpoint_url
        if isinstance(exc, NoCredentialsError):
            return (
                f"no S3 credentials for bucket {bucket!r}: set KONTEXT_S3_ACCESS_KEY_ID and "
                "KONTEXT_S3_SECRET_ACCESS_KEY, or configure boto3's credential chain"
            )
        if isinstance(exc, EndpointConnectionError):
            return (
                f"cannot reach the S3 endpoint {endpoint}: check KONTEXT_S3_ENDPOINT_URL "
                f"and that the server is running ({exc})"
            )
        code = _error_code(exc) if isinstance(exc, ClientError) else ""
        if code in _MISSING_BUCKET_CODES:
            return (
                f"S3 bucket {bucket!r} does not exist at {endpoint}: create it, or fix the "
                "bucket in --files s3://BUCKET/prefix (or KONTEXT_S3_ENDPOINT_URL)"
            )
        if code in _DENIED_CODES:
            return (
                f"access to S3 bucket {bucket!r} at {endpoint} was refused ({code}): check "
                "KONTEXT_S3_ACCESS_KEY_ID / KONTEXT_S3_SECRET_ACCESS_KEY and the bucket policy"
            )
        if code in _WRONG_REGION_CODES:
            return (
                f"S3 bucket {bucket!r} is in another region ({code}): set KONTEXT_S3_REGION "
                "to the bucket's region"
            )
        return f"S3 bucket {bucket!r} at {endpoint} cannot be used: {exc}"


def open_s3_file_store(url: str, settings: Settings) -> S3FileStore:
    """The store for ``s3://bucket/prefix`` with the settings' ``s3_*`` values, after one
    ``HeadBucket`` (raises ``ConfigError`` when the URL, the settings or the bucket do not
    work, saying what to fix)."""
    store = S3FileStore(
        make_s3_client(settings),
        parse_s3_url(url),
        presign_expiry_s=settings.s3_presign_expiry_s,
    )
    store.verify_bucket()
    return store


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket`` or ``s3://bucket/some/prefix`` -> ``S3Location``; ``ConfigError``
    for anything else (credentials go in settings, never in the URL)."""
    parts = urlsplit(url)
    usage = "use s3://bucket or s3://bucket/prefix, with credentials in KONTEXT_S3_* settings"
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"file store URL {url!r} is not an S3 URL: {usage}")
    if not _BUCKET_PATTERN.fullmatch(parts.netloc):
        raise ConfigError(
            f"S3 bucket name {parts.netloc!r} in {url!r} is not valid: 3-63 lowercase letters,"
            f" digits, '.' and '-'; {usage}"
        )
    prefix = parts.path.strip("/")
    if prefix and not is_valid_file_key(prefix):
        raise ConfigError(
            f"S3 key prefix {prefix!r} in {url!r} is not allowed: '/'-separated segments of"
            " letters, digits, '-', '_' and '.', none starting with '.'"
        )
    return S3Location(bucket=parts.netloc, prefix=prefix)


def make_s3_client(settings: Settings) -> S3Client:
    """A boto3 S3 client from the settings: SigV4, standard retries, path-style addressing
    when ``s3_path_style`` (else virtual-hosted: ``bucket.endpoint``); static credentials
    when ``s3_access_key_id`` is set, else boto3's own chain (environment, profile, role)."""
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if settings.s3_path_style else "virtual"},
        retries={"mode": "standard", "max_attempts": _MAX_ATTEMPTS},
        connect_timeout=_CONNECT_TIMEOUT_S,
        read_timeout=_READ_TIMEOUT_S,
        # Checksums only where S3 requires them: the default (CRC32 on every upload, since
        # botocore 1.36) is refused by several S3-compatible servers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A session of our own: boto3's shared default session is not safe to create from
    # several threads; the client it makes is.
    access_key_id, secret_access_key = _static_credentials(settings)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=access_key_id,  # None, None: boto3's credential chain
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def _static_credentials(settings: Settings) -> tuple[str | None, str | None]:
    if settings.s3_access_key_id is None:
        if settings.s3_secret_access_key is not None:
            raise ConfigError(
                "KONTEXT_S3_SECRET_ACCESS_KEY is set without KONTEXT_S3_ACCESS_KEY_ID: set both,"
                " or neither to use boto3's credential chain"
            )
        return None, None
    if settings.s3_secret_access_key is None:
        raise ConfigError(
            "KONTEXT_S3_ACCESS_KEY_ID is set without KONTEXT_S3_SECRET_ACCESS_KEY: set both,"
            " or neither to use boto3's credential chain"
        )
    return settings.s3_access_key_id, settings.s3_secret_access_key.get_secret_value()


def _checked_expiry_s(expiry_s: int) -> int:
    if not 1 <= expiry_s <= MAX_PRESIGN_EXPIRY_S:
        raise ConfigError(
            f"s3_presign_expiry_s={expiry_s} is not allowed: 1 to {MAX_PRESIGN_EXPIRY_S}"
            " seconds (SigV4 links last at most 7 days)"
        )
    return expiry_s


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
