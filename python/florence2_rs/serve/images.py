"""Images from requests: base64, `data:` URLs, uploaded bytes and (when allowed) http(s) URLs, decoded only
after their declared size has been checked against the server's pixel limit.

Pillow reads the width and height from the header without decoding the pixels; an image whose header
declares more pixels than allowed (a decompression bomb: a few kilobytes that would decode to gigabytes) is
refused before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union

from ..processing import load_image
from .schemas import RequestError


@dataclass(frozen=True)
class ImageLimits:
    """What the server accepts.

    Attributes:
        max_pixels: the most pixels (width × height) an image may declare.
        allow_url_fetch: whether http(s) URLs are fetched.
        allow_private_urls: whether a fetched URL may resolve to a private, loopback or link-local address.
        fetch_timeout_s: the time allowed to fetch an image URL, from its host's lookup to its last byte (the
            lookup itself is bounded by the system resolver's own timeout).
        max_fetch_bytes: the most bytes read from a URL.
    """

    max_pixels: int = 50_000_000
    allow_url_fetch: bool = False
    allow_private_urls: bool = False
    fetch_timeout_s: float = 10.0
    max_fetch_bytes: int = 20 * 1024 * 1024


def image_bytes(source: str, limits: ImageLimits) -> bytes:
    """The encoded image a request names: a `data:` URL, an http(s) URL (fetched) or bare base64.

    Raises:
        RequestError: undecodable base64 (400), a URL the server may not or cannot fetch (400), a fetched image
            over the byte cap (413).
    """
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError("a data: URL must be base64: data:image/png;base64,...", code="invalid_image")
        return _b64decode(payload)
    if source.startswith(("http://", "https://")):
        return fetch_url(source, limits)
    return _b64decode(source)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the image is neither valid base64 nor a data: URL (nor an http(s) URL)",
                           code="invalid_image") from None


def decode_image(data: bytes, limits: ImageLimits) -> Any:
    """An RGB PIL image from encoded bytes, as transformers' `load_image` gives it (EXIF orientation applied).

    Raises:
        RequestError: not an image or a corrupt one (400); more pixels than `limits.max_pixels` (413).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:  # reads the header only
            width, height = opened.size
    except Image.DecompressionBombError as err:
        raise RequestError(f"the image declares too many pixels: {err}", status=413,
                           code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"not an image, or one Pillow cannot read: {err}", code="invalid_image") from None
    if width * height > limits.max_pixels:
        raise RequestError(f"the image is {width}x{height} = {width * height} pixels; this server takes at most "
                           f"{limits.max_pixels}", status=413, code="image_too_large")
    try:
        image = load_image(data)
    except Image.DecompressionBombError as err:
        raise RequestError(f"the image holds an image with too many pixels: {err}", status=413,
                           code="image_too_large") from None
    except MemoryError as err:
        raise RequestError(f"the image is too large to decode: {err}", status=413, code="image_too_large") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for corrupt data; each is this image's fault
        raise RequestError(f"the image is corrupt or truncated: {type(err).__name__}: {err}",
                           code="invalid_image") from None
    if image.width * image.height > limits.max_pixels:  # a container whose inner image is larger than its header
        raise RequestError(f"the image decodes to {image.width}x{image.height} pixels; this server takes at most "
                           f"{limits.max_pixels}", status=413, code="image_too_large")
    return image


def limit_decoder(limits: ImageLimits) -> None:
    """Sets Pillow's decompression-bomb limit (process-wide) to the server's pixel limit.

    `decode_image` checks the outer header before decoding, but a container can hold a larger image (an
    ICO's PNG) that only Pillow's own check sees while decoding; Pillow refuses above twice its limit, and
    `decode_image` checks the decoded size again.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = limits.max_pixels


#: The most URL fetches at once: each holds a worker thread for up to the fetch timeout.
MAX_CONCURRENT_FETCHES = 4
_FETCHES = threading.BoundedSemaphore(MAX_CONCURRENT_FETCHES)
_CHUNK = 64 * 1024


def fetch_url(url: str, limits: ImageLimits) -> bytes:
    """The bytes at an http(s) URL, within the limits: allowed by the server, to a public address unless
    private ones are allowed, no redirects, no proxy, at most `limits.max_fetch_bytes`, all within
    `limits.fetch_timeout_s` (waiting for a fetch slot, connecting and reading together).

    The host is resolved once; the connection goes to the address that was checked (the TLS name and the
    Host header stay the URL's host), so a DNS answer that changes after the check is never used.

    Raises:
        RequestError: fetching is off, the host is private or cannot be resolved, the fetch fails or takes
            longer than the timeout (400), the body is larger than the cap (413), or `MAX_CONCURRENT_FETCHES`
            fetches are running for the whole timeout (503).
    """
    if not limits.allow_url_fetch:
        raise RequestError("this server does not fetch image URLs (start it with --allow-url-fetch); send the "
                           "image as base64 or a data: URL", code="url_fetch_disabled")
    deadline = time.monotonic() + limits.fetch_timeout_s
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise RequestError(f"invalid port in the image URL {url!r}", code="invalid_image_url") from None
    if not parsed.hostname:
        raise RequestError(f"no host in the image URL {url!r}", code="invalid_image_url")
    address = _resolve(parsed.hostname, port, limits.allow_private_urls)
    if not _FETCHES.acquire(timeout=_left(deadline)):
        raise RequestError("too many image URLs are being fetched; retry shortly, or send the image as base64",
                           status=503, code="fetch_busy", error_type="server_error", headers={"Retry-After": "1"})
    try:
        return _read_pinned(url, address, deadline, limits)
    finally:
        _FETCHES.release()


def _read_pinned(url: str, address: str, deadline: float, limits: ImageLimits) -> bytes:
    """Reads `url` from `address` in chunks until `deadline`, when a watchdog shuts its sockets down."""
    pin = _Pin(address, deadline)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect, _PinnedHTTPHandler(pin),
                                         _PinnedHTTPSHandler(pin))
    timeout = f"the image URL took longer than the fetch timeout ({limits.fetch_timeout_s:g} s)"
    data = bytearray()
    watchdog = threading.Timer(_left(deadline), pin.expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "florence2-serve"}),
                         timeout=_left(deadline)) as response:
            while len(data) <= limits.max_fetch_bytes:
                chunk = response.read1(_CHUNK)  # returns what one read gives, rather than waiting for _CHUNK
                if not chunk:
                    break
                data += chunk
    except urllib.error.HTTPError as err:
        raise RequestError(f"fetching the image URL gave HTTP {err.code}", code="image_url_fetch_failed") from None
    except (TimeoutError, socket.timeout):
        raise RequestError(timeout, code="image_url_fetch_failed") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise RequestError(timeout, code="image_url_fetch_failed") from None
        raise RequestError(f"cannot fetch the image URL: {err}", code="image_url_fetch_failed") from None
    except (OSError, ValueError, http.client.HTTPException) as err:
        if pin.expired:
            raise RequestError(timeout, code="image_url_fetch_failed") from None
        raise RequestError(f"cannot fetch the image URL: {err}", code="image_url_fetch_failed") from None
    finally:
        watchdog.cancel()
    if pin.expired and len(data) <= limits.max_fetch_bytes:  # the body ended because its sockets were shut
        raise RequestError(timeout, code="image_url_fetch_failed")
    if len(data) > limits.max_fetch_bytes:
        raise RequestError(f"the image at the URL is larger than {limits.max_fetch_bytes} bytes", status=413,
                           code="image_too_large")
    return bytes(data)


def _left(deadline: float) -> float:
    """Seconds to `deadline`; a positive minimum, so that a passed deadline times out at once."""
    return max(deadline - time.monotonic(), 1e-3)


def _resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to: the host's first, after checking every address it has is public (unless
    private ones are allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except OSError as err:
        raise RequestError(f"cannot resolve the image URL's host {host!r}: {err}",
                           code="image_url_fetch_failed") from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for text in addresses:
            address = ipaddress.ip_address(text.split("%")[0])
            if not is_public_address(address):
                raise RequestError(f"the image URL's host {host!r} resolves to a non-public address ({address}); "
                                   "start the server with --allow-private-urls to fetch from it",
                                   code="image_url_forbidden")
    if not addresses:
        raise RequestError(f"the image URL's host {host!r} has no address", code="image_url_fetch_failed")
    return addresses[0]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def is_public_address(address: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]) -> bool:
    """Whether `address` is global, and so is every IPv4 address carried inside it (IPv4-mapped, 6to4,
    Teredo's client, NAT64's 64:ff9b::/96 and the IPv4-compatible ::/96): such an IPv6 address reaches the
    IPv4 one, so `::127.0.0.1` or `64:ff9b::7f00:1` is as private as 127.0.0.1."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return True
    embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(v4 is None or v4.is_global for v4 in embedded)


class _Pin:
    """Where a fetch connects (the checked address, whatever the host name resolves to by then) and until
    when: `expire` shuts its sockets down, so that a read blocked in a slow server's headers or body ends at
    the deadline rather than at each socket operation's timeout."""

    def __init__(self, address: str, deadline: float) -> None:
        self.address, self.deadline = address, deadline
        self.expired = False
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()

    def connect(self, port: int, wrap: Optional[Callable[[socket.socket], socket.socket]] = None) -> socket.socket:
        """A socket to the pinned address (wrapped by `wrap`, for TLS), each operation bounded by the time left."""
        sock = socket.create_connection((self.address, port), _left(self.deadline))
        if wrap is not None:
            sock = wrap(sock)
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def expire(self) -> None:
        """Ends the fetch: blocked and later reads of its sockets return at once."""
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the pinned address; the Host header is still the URL's host."""

    def __init__(self, host: str, *, pin: _Pin, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._pin = pin

    def connect(self) -> None:  # noqa: D102 - http.client's hook
        self.sock = self._pin.connect(self.port)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """`_PinnedHTTPConnection` over TLS: the certificate is checked against the URL's host name."""

    def __init__(self, host: str, *, pin: _Pin, **kwargs: Any) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, context=self._tls, **kwargs)
        self._pin = pin

    def connect(self) -> None:  # noqa: D102 - http.client's hook
        self.sock = self._pin.connect(self.port, lambda raw: self._tls.wrap_socket(raw, server_hostname=self.host))


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    """Opens http URLs with `_PinnedHTTPConnection`."""

    def __init__(self, pin: _Pin) -> None:
        super().__init__()
        self._pin = pin

    def http_open(self, req: urllib.request.Request) -> Any:  # noqa: D102 - urllib's hook
        return self.do_open(functools.partial(_PinnedHTTPConnection, pin=self._pin), req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    """Opens https URLs with `_PinnedHTTPSConnection`."""

    def __init__(self, pin: _Pin) -> None:
        super().__init__()
        self._pin = pin

    def https_open(self, req: urllib.request.Request) -> Any:  # noqa: D102 - urllib's hook
        return self.do_open(functools.partial(_PinnedHTTPSConnection, pin=self._pin), req)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: each target would need the address check again."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)
