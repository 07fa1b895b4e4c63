"""SIP messages: framing, start line and header lines ours; header values via sipmessage.

sipmessage parses the structured values well (Via, addresses, URIs, CSeq, auth) but not
the message itself (no header folding, no Content-Length framing for TCP, no limits), so
this module cuts bytes into messages and leaves the values to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
REASONS = {100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK",
           400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 407: "Proxy Authentication Required",
           408: "Request Timeout", 413: "Request Entity Too Large", 415: "Unsupported Media Type",
           416: "Unsupported URI Scheme", 420: "Bad Extension",
           480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
           482: "Loop Detected", 483: "Too Many Hops", 486: "Busy Here",
           487: "Request Terminated", 500: "Server Internal Error", 501: "Not Implemented",
           503: "Service Unavailable", 505: "Version Not Supported", 603: "Decline"}


class SipError(Exception):
    """A message that cannot be used; `status` is what a request gets back (0: drop)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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

    def _memo(self, key: str, make):
        """Parsed header values, kept while the headers are unchanged (they are parsed by
        regular expressions, and a request is read many times on its way)."""
        memo = self.__dict__.setdefault("_parsed", {})
        stamp = (key, len(self.headers))
        if stamp not in memo:
            memo[stamp] = make()
        return memo[stamp]

    @property
    def vias(self) -> list[Via]:
        def make() -> list[Via]:
            try:
                return [Via.parse(v) for v in self.get_all("via")]
            except ValueError:
                raise SipError("bad Via header") from None
        return self._memo("via", make)

    @property
    def cseq(self) -> CSeq:
        try:
            return CSeq.parse(self.get("cseq") or "")
        except ValueError:
            raise SipError("bad CSeq header") from None

    def address(self, name: str) -> Address:
        def make() -> Address:
            try:
                return Address.parse(self.get(name) or "")
            except ValueError:
                raise SipError(f"bad {canonical(name)} header") from None
        return self._memo(name.lower(), make)

    @property
    def request_uri(self) -> URI:
        try:
            return URI.parse(self.uri)
        except ValueError:
            scheme = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", self.uri)
            raise SipError("bad Request-URI", 416 if scheme and not
                           self.uri.lower().startswith(("sip:", "sips:", "tel:")) else 400) \
                from None

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
    if '"' not in value and "<" not in value:
        return [p.strip() for p in value.split(",") if p.strip()]  # the common case
    parts, depth, quoted, current = [], 0, False, []
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
        elif ch == "," and not quoted and depth == 0:
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
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipError("headers are not UTF-8") from None
    lines = _unfold(text.replace("\r\n", "\n").split("\n"))
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
        if not length.isdigit():
            raise SipError("bad Content-Length")
        n = int(length)
        if n > len(body):
            raise SipError("Content-Length is larger than the body" if not stream
                           else "truncated body")
        body = body[:n]
    elif stream:
        raise SipError("Content-Length is required over TCP")
    msg.body = body
    return msg


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
        if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
            raise SipError("bad status line", 0)
        return SipMessage(status=int(parts[1]), reason=" ".join(parts[2:]))
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
            match = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
            if match is None:
                raise SipError("Content-Length is required over TCP", 0)
            total = end + 4 + int(match.group(1))
            if total > MAX_MESSAGE:
                raise SipError("message too large", 0)
            if len(self._buffer) < total:
                return out
            out.append(bytes(self._buffer[:total]))
            del self._buffer[:total]
