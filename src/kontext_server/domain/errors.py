"""The exception tree of kontext-server.

    KontextError                     base of everything raised on purpose
    ├── ConfigError                  settings that cannot work (bad URL, missing file)
    ├── ModelLoadError               weights not found / not loadable / download refused
    ├── InputError                   the caller's input is unusable (-> error_type bad_request)
    │   ├── ImageFetchError          an image URL could not be fetched (SSRF refusal, HTTP error,
    │   │                            time or byte cap)
    │   └── ImageDecodeError         bytes are not an allowed, sane image (format, bomb, corrupt)
    ├── EditCancelled                the edit was cancelled between two denoising steps
    └── StoreError                   a job-store invariant was violated (programmer error)
        └── StoreUnavailableError    the job store cannot be reached now (HTTP 503; retry)

Failures of a *job* are data (``Job.error`` / ``Job.error_type``); these exceptions are for
control flow at the boundaries. Third-party exceptions are mapped to these where they cross
into the service.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EditCancelled",
    "ImageDecodeError",
    "ImageFetchError",
    "InputError",
    "KontextError",
    "ModelLoadError",
    "StoreError",
    "StoreUnavailableError",
]


class KontextError(Exception):
    """Base class of every exception kontext-server raises on purpose."""


class ConfigError(KontextError):
    """A setting that cannot work; the message says which and what is allowed."""


class ModelLoadError(KontextError):
    """The model could not be loaded; the message says where it looked and what to do."""


class InputError(KontextError):
    """The caller's input cannot be used. ``error_type`` is the fal vocabulary word."""

    error_type = "bad_request"


class ImageFetchError(InputError):
    """An image URL could not be fetched (refused address, HTTP error, time or byte cap)."""

    error_type = "file_download_error"


class ImageDecodeError(InputError):
    """Bytes that are not an allowed, sane image."""

    error_type = "image_load_error"


class EditCancelled(KontextError):
    """Raised from the step callback when cancellation was requested; nothing is decoded."""


class StoreError(KontextError):
    """A job-store invariant was violated."""


class StoreUnavailableError(StoreError):
    """The job store cannot be reached (its server is down, restarting or unreachable).
    Nothing was written by the call that raised it; the same call may work once the store
    is back. The API answers 503 with ``Retry-After``."""
