"""botocore's errors, translated once into clipexport's `StorageError` tree.

Every S3 request goes through `S3Errors.call`: a ClientError the caller
expects (a missing key, an upload already gone) comes back as None instead
of raising; anything else becomes a StorageError whose message names
the endpoint, bucket and key, never a credential. `transient` says which
errors are worth another try after botocore's own (network, 5xx,
throttling), for the retry loop of `storage.transfer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import botocore.exceptions as bce
from botocore.exceptions import ClientError

from clipexport.errors import (
    PreconditionFailedError,
    StorageAuthError,
    StorageError,
    StorageNotFoundError,
    StorageUnreachableError,
)

_AUTH_CODES = {
    "401",
    "403",
    "AccessDenied",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "Unauthorized",
}
_NOT_FOUND_CODES = {"404", "NoSuchBucket", "NoSuchKey", "NotFound"}
_PRECONDITION_CODES = {"412", "PreconditionFailed"}
#: Network failures that leave nothing to conclude: try again later.
NETWORK_ERRORS = (
    bce.EndpointConnectionError,
    bce.ConnectionClosedError,
    bce.ConnectTimeoutError,
    bce.ReadTimeoutError,
    bce.ResponseStreamingError,
    bce.IncompleteReadError,
    bce.HTTPClientError,
)
CREDENTIAL_ERRORS = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.CredentialRetrievalError,
    bce.ProfileNotFound,
)
#: What a request to S3 can raise: the errors `S3Errors.call` translates.
BOTO_ERRORS = (ClientError, bce.BotoCoreError)

Expected = Callable[[ClientError], bool]


def code(exc: ClientError) -> str:
    """The error's S3 code, else its HTTP status as text (a HEAD has no body)."""
    error = exc.response.get("Error", {}).get("Code")
    return str(error or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def codes(*names: str, statuses: tuple[int, ...] = ()) -> Expected:
    """An `expected` predicate: the error's code is one of `names`, or its status one of `statuses`."""
    return lambda exc: code(exc) in names or status(exc) in statuses


def transient(exc: BaseException) -> bool:
    """Worth another try after botocore's own: network, 5xx, throttling."""
    if isinstance(exc, ClientError):
        return status(exc) >= 500 or code(exc) in ("SlowDown", "RequestTimeout", "InternalError")
    return isinstance(exc, NETWORK_ERRORS)


class S3Errors:
    """Names and translates the errors of one store's requests (bucket, prefix, endpoint)."""

    def __init__(self, bucket: str, prefix: str, endpoint_label: str, max_attempts: int) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_label, self.max_attempts = endpoint_label, max_attempts
        self.secrets: list[str] = []  # the credential's secret parts, scrubbed from every message

    def where(self, key: str | None = None) -> str:
        name = f"s3://{self.bucket}/{self.prefix}{key or ''}" if key is not None else f"bucket {self.bucket!r}"
        return f"{name} at {self.endpoint_label}"

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def call(self, op: str, key: str | None, fn: Callable[..., Any], *args: Any,
             expected: Expected | None = None, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`; None for an `expected` ClientError, a StorageError for any other.

        `fn` must not return None itself when the caller tells the two apart.
        """
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            if expected is not None and expected(exc):
                return None
            raise self.translate(exc, op, key) from exc
        except bce.BotoCoreError as exc:
            raise self.translate(exc, op, key) from exc

    def auth_error(self, exc: Exception) -> StorageAuthError:
        if isinstance(exc, bce.ProfileNotFound):
            return StorageAuthError(f"AWS profile {exc.kwargs.get('profile')!r} not found (for {self.endpoint_label})")
        return StorageAuthError(
            f"no usable S3 credentials for {self.endpoint_label}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE ({type(exc).__name__})"
        )

    def translate(self, exc: BaseException, op: str, key: str | None = None) -> StorageError:
        """The StorageError for a botocore error during `op` on `key`."""
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, ClientError):
            return self._client_error(exc, op, key)
        where = self.where(key)
        if isinstance(exc, CREDENTIAL_ERRORS):
            return self.auth_error(exc)
        if isinstance(exc, bce.SSLError):
            return StorageUnreachableError(f"{op} {where}: TLS failed ({self.scrub(str(exc))[:200]})")
        if isinstance(exc, NETWORK_ERRORS):
            return StorageUnreachableError(
                f"{op} {where}: endpoint did not answer ({type(exc).__name__}) after {self.max_attempts} tries"
            )
        return StorageError(f"{op} {where}: {type(exc).__name__}: {self.scrub(str(exc))[:200]}")

    def _client_error(self, exc: ClientError, op: str, key: str | None) -> StorageError:
        where, name, http = self.where(key), code(exc), status(exc)
        if name in _AUTH_CODES or http in (401, 403):
            what = "access denied" if name == "AccessDenied" else "credentials rejected"
            return StorageAuthError(f"{op} {where}: {what} ({name or http}); check the access key, secret and endpoint")
        if name == "NoSuchBucket":
            return StorageNotFoundError(f"{op} {where}: bucket {self.bucket!r} does not exist")
        if name in _NOT_FOUND_CODES or http == 404:
            return StorageNotFoundError(f"{op} {where}: not found ({name or http})")
        if name in _PRECONDITION_CODES or http == 412:
            return PreconditionFailedError(f"{op} {where}: the object changed (412 {name})")
        message = self.scrub(str(exc.response.get("Error", {}).get("Message") or ""))[:200]
        return StorageError(f"{op} {where}: {name or http}{': ' + message if message else ''}")
