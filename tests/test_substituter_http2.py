"""HTTP/2 where the server offers it: an HTTPS binary cache on 127.0.0.1 that
speaks only h2 (ALPN), with a self-signed certificate given as ssl-cert-file."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lazystore.cli.fetch import unpack_into
from lazystore.nix.storepath import StorePath
from lazystore.substituter.client import Substituters
from lazystore.substituter.config import SubstituterConfig
from lazystore.substituter.errors import NotAvailableError
from lazystore.testing import nixcache


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class H2Server:
    """Serves a folder over HTTPS with HTTP/2 only; records (connection, path)."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        self.root = root
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[tuple[int, str]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            thread = threading.Thread(target=self._connection, args=(raw, number), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _connection(self, raw: socket.socket, number: int) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                assert tls.selected_alpn_protocol() == "h2"
                self._speak_h2(tls, number)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass

    def _speak_h2(self, tls: ssl.SSLSocket, number: int) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        pending: dict[int, memoryview] = {}  # stream -> body still to send
        while data := tls.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers)[b":path"].decode()
                    with self.lock:
                        self.requests.append((number, path))
                    pending[event.stream_id] = self._respond(conn, event.stream_id, path)
                elif isinstance(event, h2.events.StreamReset):
                    pending.pop(event.stream_id, None)
            self._send_bodies(conn, pending)
            tls.sendall(conn.data_to_send())

    def _respond(self, conn: h2.connection.H2Connection, stream: int, path: str) -> memoryview:
        target = (self.root / path.lstrip("/")).resolve()
        found = self.root.resolve() in target.parents and target.is_file()
        body = target.read_bytes() if found else b"not found\n"
        conn.send_headers(stream, [(":status", "200" if found else "404"),
                                   ("content-length", str(len(body)))])
        return memoryview(body)

    @staticmethod
    def _send_bodies(conn: h2.connection.H2Connection, pending: dict[int, memoryview]) -> None:
        for stream, body in list(pending.items()):
            while body:
                size = min(conn.local_flow_control_window(stream),
                           conn.max_outbound_frame_size, len(body))
                if size <= 0:
                    break
                conn.send_data(stream, body[:size].tobytes())
                body = body[size:]
            if body:
                pending[stream] = body
            else:
                conn.end_stream(stream)
                del pending[stream]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in serve()
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def h2_cache(binary_cache: nixcache.BinaryCache, tmp_path: Path) -> Iterator[tuple[H2Server, Path]]:
    cert, key = _self_signed(tmp_path)
    server = H2Server(binary_cache.root, cert, key)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server, cert
    finally:
        server.close()
        thread.join(timeout=10)


async def test_closure_over_http2_uses_one_multiplexed_connection(
        binary_cache: nixcache.BinaryCache, h2_cache: tuple[H2Server, Path],
        tmp_path: Path) -> None:
    server, cert = h2_cache
    config = SubstituterConfig(urls=[server.url],
                               trusted_public_keys=[binary_cache.key.public_key],
                               netrc_file=None, ssl_cert_file=cert, stall_timeout=30.0)
    dest, tmp = tmp_path / "store", tmp_path / "tmp"
    dest.mkdir()
    tmp.mkdir()
    async with Substituters(config) as subs:
        infos = await subs.closure([StorePath.parse(binary_cache.top)])
        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(subs.fetch, info, unpack_into(dest / info.path.basename, tmp))
    for info in infos:
        got = nixcache.nar_hash(str(dest / info.path.basename))
        assert got.removeprefix("sha256:") == info.nar_hash.nix32()
    paths = [path for _, path in server.requests]
    assert len([p for p in paths if p.startswith("/nar/")]) == len(binary_cache.paths)
    assert server.connections == 1  # every request multiplexed on one h2 connection


@pytest.mark.allow_log('is unreachable: .*CERTIFICATE_VERIFY_FAILED')
async def test_untrusted_certificate_is_a_clear_error(
        binary_cache: nixcache.BinaryCache, h2_cache: tuple[H2Server, Path]) -> None:
    server, _ = h2_cache
    config = SubstituterConfig(urls=[server.url],
                               trusted_public_keys=[binary_cache.key.public_key],
                               netrc_file=None, attempts=1)
    async with Substituters(config) as subs:
        with pytest.raises(NotAvailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await subs.query(StorePath.parse(binary_cache.top))


async def test_netrc_credentials_over_http2_are_never_logged(
        binary_cache: nixcache.BinaryCache, h2_cache: tuple[H2Server, Path],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, hpack logs header blocks (Huffman coding hides nothing)."""
    caplog.set_level(logging.DEBUG)
    server, cert = h2_cache
    secret = "s3cret-h2-do-not-log"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {secret}\n")
    config = SubstituterConfig(urls=[server.url],
                               trusted_public_keys=[binary_cache.key.public_key],
                               netrc_file=netrc, ssl_cert_file=cert, stall_timeout=30.0)
    async with Substituters(config) as subs:
        assert await subs.query(StorePath.parse(binary_cache.top)) is not None
    token = base64.b64encode(f"alice:{secret}".encode()).decode()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage()
        assert secret not in text and token not in text
        assert not record.name.startswith("hpack"), text
