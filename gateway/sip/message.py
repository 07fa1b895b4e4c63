"""SIP messages: framing, start line and header lines ours; header values via sipmessage.

sipmessage parses the structured values well (Via, addresses, URIs, CSeq, auth) but not
the message itself (no header folding, no Content-Length framing for TCP, no limits), so
this module cuts bytes into messages and leaves the values to it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sipmessage import URI, Address, CSeq, Via

MAX_MESSAGE = 65535
MAX_HEADERS = 100
MAX_HEADER_LINE = 8192

COMPACT = {"i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
           "c": "content-type", "f": "from", "k": "supported", "s": "subject", "t": "to",
           "v": "via", "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by",
           "x": "session-expires", "y": "identity"}
CANONICAL = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate",
             "max-forwards": "Max-Forwards", "content-length": "Content-Length",
             "content-type": "Content-Type"}
TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
# sent-protocol and sent-by of a Via (RFC 3261 20.42: SLASH and COLON allow whitespace)
SENT_BY = re.compile(r"\s*SIP\s*/\s*2\.0\s*/\s*\S+?\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)"
                     r"(?:\s*:\s*(\S*))?\s*$", re.I)
HEADER_CHARSETS = ("utf-8", "cp1252", "latin-1")  # the last one decodes any byte
T = TypeVar("T")
REASONS = {100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK",
           400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 407: "Proxy Authentication Required",
           408: "Request Timeout", 413: "Request Entity Too Large", 415: "Unsupported Media Type",
           416: "Unsupported URI Scheme", 420: "Bad Extension",
           480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
           482: "Loop Detected", 483: "Too Many Hops", 486: "Busy Here",
           487: "Request Terminated", 500: "Server Internal Error", 501: "Not Implemented",
           503: "Service Unavailable", 505: "Version Not Supported", 513: "Message Too Large",
           603: "Decline"}


class SipError(Exception):
    """A message that cannot be used; `status` is what a request gets back (0: drop)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Bad:
    """A header value found unusable, remembered as text: a kept exception object would
    keep the traceback of every raise (each raise of one object adds its frames)."""

    message: str
    status: int = 400


def grammar(parse: Callable[[str], T], value: str) -> T | None:
    """sipmessage's `parse(value)`, or None where the value does not parse.

    sipmessage raises module-level exception objects (VIA_EXCEPTION, ADDRESS_EXCEPTION):
    every raise of one links the raising frames in front of that one object's
    __traceback__, so each failure kept its whole message alive for good (20,000 bad Vias:
    +182 MiB). What is caught here is emptied before anything else sees it, and callers
    raise their own SipError after the `except` block, so nothing chains to it either.
    """
    try:
        return parse(value)
    except ValueError as exc:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return None


def number(text: str | None, digits: int) -> int | None:
    """A decimal of ASCII digits (str.isdigit also passes Arabic-Indic ones), at most
    `digits` of them besides leading zeros (int() of thousands raises), else None."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    significant = text.lstrip("0")
    return int(significant or "0") if len(significant) <= digits else None


def port_number(text: str | None) -> int | None:
    """A port a datagram can be sent to: 1-65535, ASCII digits."""
    port = number(text, 5)
    return port if port is not None and 0 < port < 65536 else None


def sent_by(value: str) -> tuple[str, str | None] | None:
    """A Via value's sent-by host (without brackets) and port text (None when absent)."""
    head = split_outside_quotes(value, ";")
    match = SENT_BY.match(head[0]) if head else None
    if match is None:
        return None
    return match.group(1).strip("[]"), match.group(2)


def via_parameters(value: str) -> dict[str, str | None]:
    """A Via value's parameters by lower-case name (a flag's value is None); never raises."""
    out: dict[str, str | None] = {}
    for param in split_outside_quotes(value, ";")[1:]:
        name, eq, val = param.partition("=")
        out.setdefault(name.strip().lower(), val.strip() if eq else None)
    return out


def check_top_via(value: str) -> str | None:
    """What is wrong with the top Via's sent-by, rport or received, or None.

    Responses never go where these say (see transaction.response_destination), but a
    request that carries impossible ones is refused with 400 instead of being rung:
    RFC 3261 20.42 and RFC 3581 allow only a port (1-65535) and an IP address there.
    """
    hostport = sent_by(value)
    if hostport is None:
        return "bad Via sent-by"
    if hostport[1] is not None and port_number(hostport[1]) is None:
        return "bad Via port"
    params = via_parameters(value)
    rport = params.get("rport")
    if rport is not None and port_number(rport) is None:
        return "bad Via rport"
    if "received" in params:
        try:
            ipaddress.ip_address((params["received"] or "").strip("[]"))
        except ValueError:
            return "bad Via received"
    return None


def canonical(name: str) -> str:
    lower = name.lower()
    return CANONICAL.get(lower) or "-".join(p.capitalize() for p in lower.split("-"))


@dataclass
class SipMessage:
    """A request (method set) or a response (status set), headers in order."""

    method: str = ""
    uri: str = ""
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # (lower-case name, value)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value, comma-separated lists split (for Via, Contact, Allow...)."""
        name = name.lower()
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out.extend(split_commas(value))
        return out

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.headers.append((name.lower(), value))

    def remove(self, name: str) -> None:
        name = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k != name]
        self.__dict__.pop("_parsed", None)

    # typed views (sipmessage does the grammar)

    def _memo(self, key: str, make: Callable[[], T | _Bad]) -> T:
        """Parsed header values, kept while the headers are unchanged (they are parsed by
        regular expressions, and a request is read many times on its way). A bad one is
        kept as text and raised anew each time."""
        memo = self.__dict__.setdefault("_parsed", {})
        stamp = (key, len(self.headers))
        if stamp not in memo:
            memo[stamp] = make()
        value = memo[stamp]
        if isinstance(value, _Bad):
            raise SipError(value.message, value.status)
        return value

    @property
    def vias(self) -> list[Via]:
        """Every Via, the top one checked (check_top_via)."""
        def make() -> list[Via] | _Bad:
            values = self.get_all("via")
            parsed = [grammar(Via.parse, v) for v in values]
            vias = [v for v in parsed if v is not None]
            if len(vias) != len(parsed):
                return _Bad("bad Via header")
            problem = check_top_via(values[0]) if values else None
            return _Bad(problem) if problem else vias
        return self._memo("via", make)

    @property
    def cseq(self) -> CSeq:
        def make() -> CSeq | _Bad:
            value = self.get("cseq") or ""
            cseq = grammar(CSeq.parse, value) if value.isascii() else None
            return _Bad("bad CSeq header") if cseq is None else cseq
        return self._memo("cseq", make)

    def address(self, name: str) -> Address:
        def make() -> Address | _Bad:
            address = grammar(Address.parse, self.get(name) or "")
            return _Bad(f"bad {canonical(name)} header") if address is None else address
        return self._memo(name.lower(), make)

    @property
    def request_uri(self) -> URI:
        def make() -> URI | _Bad:
            uri = grammar(URI.parse, self.uri)
            if uri is not None:
                return uri
            scheme = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", self.uri)
            return _Bad("bad Request-URI", 416 if scheme and not
                        self.uri.lower().startswith(("sip:", "sips:", "tel:")) else 400)
        return self._memo(" uri", make)

    @property
    def call_id(self) -> str:
        return self.get("call-id") or ""

    @property
    def branch(self) -> str:
        vias = self.vias
        return vias[0].parameters.get("branch") or "" if vias else ""

    def to_tag(self) -> str | None:
        return self.address("to").parameters.get("tag")

    def encode(self) -> bytes:
        if self.is_request:
            start = f"{self.method} {self.uri} SIP/2.0"
        else:
            start = f"SIP/2.0 {self.status} {_clean(self.reason or REASONS.get(self.status, ''))}"
        lines = [start]
        lines.extend(f"{canonical(k)}: {_clean(v)}" for k, v in self.headers
                     if k != "content-length")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _clean(value: str) -> str:
    return re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", " ", value)


def split_commas(value: str) -> list[str]:
    """Split a header value on commas that are outside quotes and angle brackets."""
    return split_outside_quotes(value, ",")


def split_outside_quotes(value: str, sep: str) -> list[str]:
    """Split on `sep` outside quotes and angle brackets; parts stripped, empty ones dropped."""
    if '"' not in value and "<" not in value:
        return [p.strip() for p in value.split(sep) if p.strip()]  # the common case
    parts: list[str] = []
    current: list[str] = []
    depth, quoted = 0, False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif ch == sep and not quoted and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse(data: bytes, stream: bool = False) -> SipMessage:
    """One whole message; over UDP the body is the rest of the datagram (Content-Length
    may shorten it, never lengthen it)."""
    if len(data) > MAX_MESSAGE:
        raise SipError("message too large", 413)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")  # bare LF, seen in the wild
        if not sep:
            raise SipError("no blank line after the headers")
    lines = _unfold(_decode(head).replace("\r\n", "\n").split("\n"))
    while lines and not lines[0].strip():
        lines.pop(0)  # leading CRLFs are keepalives (RFC 5626) or junk
    if not lines:
        raise SipError("empty message", 0)
    msg = _start_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise SipError(f"more than {MAX_HEADERS} headers", 400)
    for line in lines[1:]:
        if len(line) > MAX_HEADER_LINE:
            raise SipError("header line too long", 400)
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not TOKEN.match(name):
            raise SipError(f"malformed header line {line[:40]!r}")
        key = COMPACT.get(name.lower(), name.lower())
        msg.headers.append((key, value.strip()))
    lengths = {v for k, v in msg.headers if k == "content-length"}
    if len(lengths) > 1:
        raise SipError("conflicting Content-Length headers")
    length = msg.get("content-length")
    if length is not None:
        n = number(length, 10)
        if n is None:
            raise SipError("bad Content-Length")
        if n > len(body):
            raise SipError("Content-Length is larger than the body" if not stream
                           else "truncated body")
        body = body[:n]
    elif stream:
        raise SipError("Content-Length is required over TCP")
    msg.body = body
    return msg


def _decode(head: bytes) -> str:
    """The header block as text: UTF-8 (RFC 3261 7.3.1), and where a line is not, that line
    as Windows-1252 or Latin-1: PBXs send display names like "José Müller" in their
    own code page, and a call must not be refused (400) for how its caller is spelled."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for line in head.split(b"\n"):
        for charset in HEADER_CHARSETS:
            try:
                lines.append(line.decode(charset))
                break
            except UnicodeDecodeError:
                continue
    return "\n".join(lines)


def _unfold(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t") and out and out[-1].strip():
            out[-1] = out[-1].rstrip() + " " + line.strip()
        else:
            out.append(line)
    return out


def _start_line(line: str) -> SipMessage:
    parts = line.split()
    if parts[0] == "SIP/2.0":
        status = number(parts[1], 3) if len(parts) > 1 and len(parts[1]) == 3 else None
        if status is None or not 100 <= status <= 699:  # three ASCII digits, classes 1-6
            raise SipError("bad status line", 0)
        return SipMessage(status=status, reason=" ".join(parts[2:]))
    if len(parts) != 3:
        raise SipError("bad request line")
    method, uri, version = parts
    if not TOKEN.match(method):
        raise SipError("bad method")
    if version.upper() != "SIP/2.0":
        raise SipError(f"version {version[:16]} is not supported", 505)
    return SipMessage(method=method, uri=uri)


class StreamFramer:
    """Cuts a TCP byte stream into messages by Content-Length; bounded."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out: list[bytes] = []
        while True:
            while self._buffer[:2] == b"\r\n":
                del self._buffer[:2]  # keepalive CRLFs between messages
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADERS * 200:
                    raise SipError("headers too long", 0)
                return out
            head = bytes(self._buffer[:end])
            lengths = re.findall(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\S*)", head)
            if len(set(lengths)) > 1:
                raise SipError("conflicting Content-Length headers", 0)
            match = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([0-9]+)", head)
            if match is None:
                raise SipError("Content-Length is required over TCP", 0)
            digits = match.group(1).lstrip(b"0")
            if len(digits) > 6:  # thousands of digits: int() would raise
                raise SipError("message too large", 0)
            total = end + 4 + int(digits or b"0")
            if total > MAX_MESSAGE:
                raise SipError("message too large", 0)
            if len(self._buffer) < total:
                return out
            out.append(bytes(self._buffer[:total]))
            del self._buffer[:total]
