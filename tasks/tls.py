"""TLS: the certificate each endpoint actually serves, checked concurrently (one task, asyncio
inside: a Prefect task per endpoint would cost more than the handshakes), and renewal and
reload commands run with timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from pydantic import BaseModel

from tasks.engine import io_task
from tasks.errors import ActionFailed, ConfigError
from tasks.host import run_command
from tasks.settings import TlsEndpoint
from tasks.tls_rules import declined
from tasks.wait import poll

COMMAND_TIMEOUT_SECONDS = 300


class ServedCert(BaseModel):
    """What one endpoint serves: its leaf certificate (subject, DNS and IP names, issuer,
    validity in UTC, SHA-256 fingerprint in hex), whether its chain verifies against the
    system's or the endpoint's CAs, and whether it matches the SNI name; or, when no
    handshake completed, reachable False and the error."""

    endpoint: str
    address: str
    reachable: bool
    error: str = ""
    subject: str = ""
    names: list[str] = []
    issuer: str = ""
    not_before: datetime | None = None
    not_after: datetime | None = None
    fingerprint: str = ""
    chain_ok: bool = False
    chain_error: str = ""
    hostname_ok: bool = False


def hostname_matches(name: str, names: list[str]) -> bool:
    """RFC 6125: exact, or one wildcard for the whole left-most label."""
    name = name.lower().rstrip(".")
    for pattern in (n.lower().rstrip(".") for n in names):
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def describe(der: bytes) -> dict[str, object]:
    """The ServedCert fields of one DER-encoded certificate: subject (its CN, else the whole
    RFC 4514 name), names (DNS and IP subject alternative names), issuer (likewise),
    not_before and not_after (UTC), fingerprint (SHA-256, hex). Raises ValueError when the
    bytes are not a certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "subject": str(common[0].value) if common else cert.subject.rfc4514_string(),
        "names": names,
        "issuer": str(issuer[0].value) if issuer else cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
    }


async def _handshake(
    host: str, port: int, sni: str, context: ssl.SSLContext, timeout: float
) -> bytes:
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, port, ssl=context, server_hostname=sni, ssl_handshake_timeout=timeout
        ),
        timeout,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der: bytes = ssl_object.getpeercert(binary_form=True)
        return der
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 1)


def chain_context(name: str, ep: TlsEndpoint) -> ssl.SSLContext:
    """The context a chain is verified with: the system's CAs, or the endpoint's ca_file.
    Host names are not checked by it (hostname_matches judges them apart).

    Raises ConfigError naming tls.NAME.ca_file when that file cannot be read or holds no
    certificate."""
    try:
        context = ssl.create_default_context(cafile=ep.ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.{name}.ca_file: {ep.ca_file} holds no CA certificate ({exc.reason or exc}); "
            "point it at a PEM file of the certificates that sign the endpoint's chain"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"tls.{name}.ca_file: {ep.ca_file} cannot be read ({exc.strerror or exc}); "
            "correct the path, or remove ca_file to use the system's CAs"
        ) from None
    context.check_hostname = False
    return context


async def _check(name: str, ep: TlsEndpoint, verify: ssl.SSLContext, timeout: float) -> ServedCert:
    sni = ep.server_name or ep.host
    address = f"{ep.host}:{ep.port} (SNI {sni})"
    seen = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    seen.check_hostname, seen.verify_mode = False, ssl.CERT_NONE
    try:
        der = await _handshake(ep.host, ep.port, sni, seen, timeout)
    except TimeoutError:
        return ServedCert(
            endpoint=name,
            address=address,
            reachable=False,
            error=f"no TLS handshake within {timeout:g} s",
        )
    except ssl.SSLError as exc:
        return ServedCert(
            endpoint=name,
            address=address,
            reachable=False,
            error=f"does not speak TLS: {exc.reason or exc}",
        )
    except OSError as exc:
        return ServedCert(
            endpoint=name,
            address=address,
            reachable=False,
            error=f"cannot connect: {exc.strerror or exc}",
        )
    result = ServedCert(endpoint=name, address=address, reachable=True, **describe(der))
    result.hostname_ok = hostname_matches(sni, result.names)
    try:
        await _handshake(ep.host, ep.port, sni, verify, timeout)
        result.chain_ok = True
    except ssl.SSLCertVerificationError as exc:
        result.chain_error = exc.verify_message or str(exc)
    except (OSError, TimeoutError) as exc:
        result.chain_error = f"second handshake failed: {exc}"
    return result


@io_task("read-served-certificates", timeout_seconds=600, retries=0)
def read_served_certificates(
    endpoints: dict[str, TlsEndpoint], timeouts: dict[str, float]
) -> list[ServedCert]:
    """Every endpoint at once, each with its own timeout in seconds: the whole check takes
    about the slowest handshake.

    Args:
        endpoints: [tls.NAME] entries by name.
        timeouts: seconds to connect and handshake, by the same names.

    Returns:
        One ServedCert per endpoint, in the order of `endpoints`: the certificate it serves,
        or the error when none was read (an endpoint that does not answer is a finding, not
        an error).

    Raises:
        ConfigError: an endpoint's ca_file cannot be read or holds no certificate (before
            any endpoint is contacted).
        KeyError: an endpoint has no entry in `timeouts` (a bug in the caller)."""
    # Every ca_file first: a bad one is the configuration's fault, named, before any handshake.
    verifiers = {n: chain_context(n, ep) for n, ep in endpoints.items()}

    async def all_of_them() -> list[ServedCert]:
        checks = (_check(n, ep, verifiers[n], timeouts[n]) for n, ep in endpoints.items())
        return list(await asyncio.gather(*checks))

    return asyncio.run(all_of_them())


def read_until_served(
    endpoints: dict[str, TlsEndpoint],
    timeouts: dict[str, float],
    still_old: Callable[[dict[str, ServedCert]], object],
    grace_seconds: float,
) -> list[ServedCert]:
    """Read what the endpoints serve (read_served_certificates, timeouts in seconds per
    endpoint) until still_old(the reading by endpoint name) is false, or grace_seconds have
    passed: a reload is asynchronous (old workers finish their connections). Every 0.5 s,
    through tasks.wait.poll, so a cancelled run stops meanwhile (prefect Abort).

    Returns the last reading, in the order of read_served_certificates. Raises what
    read_served_certificates raises (ConfigError for an unusable ca_file)."""

    def by_endpoint(certs: list[ServedCert]) -> dict[str, ServedCert]:
        return {c.endpoint: c for c in certs}

    return poll(
        lambda: read_served_certificates(endpoints, timeouts),
        what="the renewed certificates to be served",
        timeout_seconds=grace_seconds,
        done=lambda certs: not still_old(by_endpoint(certs)),
        first_delay_seconds=0.5,
        max_delay_seconds=0.5,
    ).value


def _run(what: str, name: str, argv: list[str], ok_codes: tuple[int, ...] = (0,)) -> str:
    """The command's stdout and stderr; ActionFailed when it exits with another code."""
    proc = run_command(f"tls endpoint {name!r}", what, argv, COMMAND_TIMEOUT_SECONDS)
    said = proc.stdout + proc.stderr
    if proc.returncode not in ok_codes or (proc.returncode != 0 and not declined(said)):
        raise ActionFailed(
            f"tls endpoint {name!r}: {what} command exited {proc.returncode}: "
            f"{proc.stderr.strip()[-800:]}"
        )
    return said


class Renewal(BaseModel):
    """Whether the renew command renewed, or the CA client's words when it declined."""

    renewed: bool
    said: str = ""  # the CA client's own words when it declined


@io_task("renew-certificate", timeout_seconds=COMMAND_TIMEOUT_SECONDS + 30, retries=0)
def renew_certificate(name: str, argv: list[str], cert_name: str | None = None) -> Renewal:
    """Run the renew command. A CA client that declines because the certificate is not due
    by its own settings (certbot's "not yet due", acme.sh's skip, which exits 2, lego's "no
    renewal") has not failed: the Renewal says it did not renew, in its words.

    Args:
        name: the [tls.NAME] endpoint's name, for messages.
        argv: the renew command, run without a shell.
        cert_name: the certificate's name in the CA client: its 'not yet due' is told apart
            from another certificate's.

    Returns:
        Renewal: whether it renewed, and the command's words.

    Raises:
        ActionFailed: the command failed, timed out, or could not be started."""
    said = _run("renew", name, argv, ok_codes=(0, 2))
    words = declined(said, cert_name)
    return Renewal(renewed=False, said=words) if words else Renewal(renewed=True)


@io_task("reload-proxy", timeout_seconds=COMMAND_TIMEOUT_SECONDS + 30, retries=0)
def reload_proxy(name: str, argv: list[str]) -> str:
    """Run the proxy's reload command (e.g. nginx -s reload) so it serves the new certificate.

    Args:
        name: the [tls.NAME] endpoint's name, for messages.
        argv: the reload command, run without a shell.

    Returns:
        "reloaded".

    Raises:
        ActionFailed: the command failed, timed out, or could not be started."""
    _run("reload", name, argv)
    return "reloaded"
