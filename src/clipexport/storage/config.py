"""Where an S3-compatible store is and how to talk to it.

Endpoint: `--endpoint-url`, else `CLIPEXPORT_S3_ENDPOINT`, else, for
`r2://`, `R2_ACCOUNT_ID` gives `https://<id>.r2.cloudflarestorage.com` with
region `auto`; `s3://` with none of them is AWS itself. Credentials come the
standard AWS way (environment, shared files, `AWS_PROFILE`); clipexport
never reads, stores or prints them. The botocore settings are the ones R2
needs: checksums only `when_required` (boto3 >= 1.36 would otherwise send
CRC trailers R2 rejects), path-style addressing for custom endpoints, and
bounded timeouts and retries so an unreachable endpoint fails in bounded
time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from clipexport.errors import UsageError

ENV_ENDPOINT = "CLIPEXPORT_S3_ENDPOINT"
ENV_R2_ACCOUNT = "R2_ACCOUNT_ID"
R2_ENDPOINT = "https://{account}.r2.cloudflarestorage.com"
R2_REGION = "auto"
DEFAULT_REGION = "us-east-1"

_ACCOUNT = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class S3Settings:
    """Everything but the credentials needed to build a client."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: TLS verification: True, False, or a CA bundle path (AWS_CA_BUNDLE also works).
    verify: bool | str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: botocore's own tries per request (standard mode, with backoff).
    max_attempts: int = 5
    max_pool_connections: int = 32  # several transfers at once, 10 streams each

    @property
    def endpoint_label(self) -> str:
        """The endpoint as printed in messages (never holds a secret)."""
        return self.endpoint_url or f"AWS S3 ({self.region or 'default region'})"

    def botocore_config(self):  # -> botocore.config.Config
        from botocore.config import Config

        s3: dict = {"payload_signing_enabled": False}
        if self.endpoint_url:
            s3["addressing_style"] = "path"
        return Config(
            region_name=self.region,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=self.max_pool_connections,
            tcp_keepalive=True,
            s3=s3,
        )


def check_endpoint(url: str) -> str:
    """An http(s) URL with a host and no user info; UsageError otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise UsageError("endpoint URL is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"endpoint URL must be http(s)://host[:port], not {parts.scheme or 'no'} scheme")
    refuse_credentials(url, "endpoint URL")
    if parts.query or parts.fragment:
        raise UsageError(f"endpoint URL must not have a query or fragment: {parts.scheme}://{parts.netloc}")
    return url.rstrip("/")


def refuse_credentials(url: str | None, names: str) -> None:
    """Refuse a URL with user info before any job exists, without echoing it.

    A job's settings are stored with it; `http://KEY:SECRET@host` would put
    the secret at rest in the job store.
    """
    if not url:
        return
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # "http://[::1": not echoed either, it may hold a secret
        raise UsageError(f"{names} is not a valid URL") from None
    if "@" in netloc:
        raise UsageError(f"{names} must not carry credentials (user:secret@): give them in "
                         "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile (AWS_PROFILE)")


def resolve(
    scheme: str,
    *,
    endpoint_url: str | None = None,
    env: Mapping[str, str] | None = None,
    **overrides,
) -> S3Settings:
    """Settings for an `s3://` or `r2://` store from flags and environment."""
    env = os.environ if env is None else env
    endpoint = endpoint_url or env.get(ENV_ENDPOINT) or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    if endpoint is None and scheme == "r2":
        account = env.get(ENV_R2_ACCOUNT, "").strip()
        if not account:
            raise UsageError(f"r2:// needs {ENV_R2_ACCOUNT} or --endpoint-url (or {ENV_ENDPOINT})")
        if not _ACCOUNT.match(account):
            raise UsageError(f"{ENV_R2_ACCOUNT} is not a Cloudflare account id")
        endpoint = R2_ENDPOINT.format(account=account)
    if endpoint is not None:
        endpoint = check_endpoint(endpoint)
        host = urlsplit(endpoint).hostname or ""
        if host.endswith(".r2.cloudflarestorage.com"):
            region = R2_REGION
        region = region or DEFAULT_REGION
    settings = S3Settings(endpoint_url=endpoint, region=region, **overrides)
    if settings.max_attempts < 1 or settings.connect_timeout <= 0 or settings.read_timeout <= 0:
        raise UsageError("S3 timeouts must be positive and max_attempts at least 1")
    return settings
