"""DKIM signatures (RFC 6376) on the final bytes of outgoing mail, made by dkimpy.

`DkimSigner.sign` prepends a DKIM-Signature (rsa-sha256, relaxed/relaxed) to a message
as it goes on the wire; nothing re-serialises the message afterwards. Its `h=` lists
`SIGNED_HEADERS`, those absent included, and those a message has once listed twice (RFC
6376 section 8.15: no one can add a second From or Subject on the way). `check` signs a
probe message and verifies it with dkimpy against the key's own public half, and checks
that the From domain aligns with DKIM_DOMAIN (DMARC, RFC 7489 section 3.1.1, relaxed):
the service refuses to start otherwise.

dkimpy canonicalises, hashes and writes the header itself; only its RSA step, a pure
Python modular exponentiation (8 of the 9 ms a signature cost, bench/signing_cost.py), is
handed to OpenSSL through `cryptography`. RSASSA-PKCS1-v1_5 is deterministic, so the
two give the same bytes, which a test checks. The key's PEM, which dkimpy parses again at
every signature, is parsed once.
"""

import base64
import logging
from email.utils import parseaddr
from functools import lru_cache
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from config import Settings

logger = logging.getLogger(__name__)

SIGNED_HEADERS = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"MIME-Version",
    b"Content-Type",
    b"Reply-To",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
)
# Present once in every message we send: listed again, so an added one breaks the signature.
OVERSIGNED = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
)
CANONICALIZATION = (b"relaxed", b"relaxed")


class DkimMisconfigured(Exception):
    """The DKIM settings cannot sign mail that verifies, or that aligns with From."""


class DkimSigner:
    """Signs messages for `domain` under `selector` with an RSA private key (PEM)."""

    def __init__(self, *, domain: str, selector: str, private_key: bytes) -> None:
        self.domain = domain.lower()
        self.selector = selector
        self._pem = private_key
        try:
            key = serialization.load_pem_private_key(private_key, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimMisconfigured(f"DKIM_PRIVATE_KEY is not a PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimMisconfigured("DKIM_PRIVATE_KEY must be an RSA key (rsa-sha256)")
        if key.key_size < 2048:
            raise DkimMisconfigured(f"DKIM_PRIVATE_KEY has {key.key_size} bits; use 2048 or more")
        self._public = key.public_key()

    @classmethod
    def from_settings(cls, settings: Settings) -> "DkimSigner | None":
        """The signer DKIM_DOMAIN, DKIM_SELECTOR and DKIM_PRIVATE_KEY describe; None
        when DKIM_DOMAIN is not set."""
        if not settings.dkim_domain:
            return None
        if settings.dkim_private_key is None:
            raise DkimMisconfigured("DKIM_DOMAIN is set but DKIM_PRIVATE_KEY is not")
        return cls(
            domain=settings.dkim_domain,
            selector=settings.dkim_selector,
            private_key=read_key(settings.dkim_private_key.get_secret_value()),
        )

    def __repr__(self) -> str:
        return f"DkimSigner(domain={self.domain!r}, selector={self.selector!r})"

    def sign(self, data: bytes) -> bytes:
        """`data` (a message with CRLF line ends) with its DKIM-Signature header first."""
        signature = dkim.sign(
            data,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self._pem,
            canonicalize=CANONICALIZATION,
            include_headers=[*SIGNED_HEADERS, *OVERSIGNED],
            linesep=b"\r\n",
        )
        return signature + data

    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        """The TXT record to publish at `dns_name()`."""
        der = self._public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"

    def check(self, sender: str) -> None:
        """Sign a probe message from `sender` and verify it with the key's own public
        half; `DkimMisconfigured` if that fails or the From domain does not align."""
        from_domain = parseaddr(sender)[1].rpartition("@")[2].lower()
        if not aligned(from_domain, self.domain):
            raise DkimMisconfigured(
                f"the From domain {from_domain!r} does not align with DKIM_DOMAIN "
                f"{self.domain!r}: DMARC needs one to be the other or its parent"
            )
        probe = self.sign(
            f"From: {sender}\r\nTo: probe@{self.domain}\r\nSubject: DKIM probe\r\n"
            f"Message-ID: <probe@{self.domain}>\r\n\r\nprobe\r\n".encode()
        )
        if not dkim.verify(probe, dnsfunc=self.resolver()):
            raise DkimMisconfigured("a probe message signed with DKIM_PRIVATE_KEY did not verify")

    def resolver(self) -> Any:
        """A dkimpy `dnsfunc` that answers our own selector's record (tests, the probe)."""
        name, record = f"{self.dns_name()}.", self.dns_record().encode("ascii")

        def txt(query: bytes | str, timeout: float = 5) -> bytes | None:
            asked = query.decode() if isinstance(query, bytes) else query
            return record if asked.rstrip(".") + "." == name else None

        return txt


def aligned(from_domain: str, dkim_domain: str) -> bool:
    """DMARC's relaxed alignment, without the public suffix list: the domains are one, or
    one is the other's subdomain."""
    a, b = from_domain.lower().rstrip("."), dkim_domain.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def read_key(value: str) -> bytes:
    """DKIM_PRIVATE_KEY's PEM: the value itself, or the file it names."""
    if "-----BEGIN" in value:
        return value.encode("ascii")
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise DkimMisconfigured(f"DKIM_PRIVATE_KEY file cannot be read: {exc.strerror}") from None


def new_key() -> bytes:
    """A new 2048-bit RSA private key, PEM (PKCS #8)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_HASHES = {"sha256": hashes.SHA256}
_pure_python_sign = dkim.RSASSA_PKCS1_v1_5_sign


@lru_cache(maxsize=8)
def _openssl_key(
    n: int, e: int, d: int, p: int, q: int, dp: int, dq: int, qi: int
) -> rsa.RSAPrivateKey:
    numbers = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n))
    return numbers.private_key()


def openssl_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, private_key)`, with OpenSSL's RSA."""
    algorithm = _HASHES.get(hash.name.lower())
    if algorithm is None:
        return bytes(_pure_python_sign(hash, private_key))
    key = _openssl_key(
        *(
            private_key[name]
            for name in (
                "modulus",
                "publicExponent",
                "privateExponent",
                "prime1",
                "prime2",
                "exponent1",
                "exponent2",
                "coefficient",
            )
        )
    )
    return key.sign(hash.digest(), padding.PKCS1v15(), Prehashed(algorithm()))


# dkimpy looks both functions up in its module at each signature.
dkim.RSASSA_PKCS1_v1_5_sign = openssl_sign
dkim.parse_pem_private_key = lru_cache(maxsize=8)(dkim.parse_pem_private_key)
