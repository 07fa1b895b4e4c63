"""MQTT 3.1.1, just enough for the Mosquitto peer's devices and publisher."""

from __future__ import annotations

import json
import ssl
from typing import Any

from lib.payloads import STAMP

# --- MQTT 3.1.1, just enough ------------------------------------------------------------


def mqtt_len(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def mqtt_connect(client_id: str, keepalive: int, clean: bool) -> bytes:
    body = mqtt_str("MQTT") + bytes([4, 0x02 if clean else 0x00]) + keepalive.to_bytes(2, "big")
    body += mqtt_str(client_id)
    return b"\x10" + mqtt_len(len(body)) + body


def mqtt_subscribe(topic: str, packet_id: int = 1, qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + mqtt_str(topic) + bytes([qos])
    return b"\x82" + mqtt_len(len(body)) + body


def mqtt_publish(topic: str, payload: bytes, packet_id: int, qos: int = 1) -> bytes:
    body = mqtt_str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + mqtt_len(len(body)) + body


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def client_context(alpn: str | None) -> ssl.SSLContext:
    """TLS 1.3 to a loopback server the bench started itself: no CA to check against (the
    devices check the server's pin instead)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx


def mqtt_stamp(payload: bytes) -> Any:
    """The publisher's STAMP in a PUBLISH payload (JSON), if it has one."""
    if STAMP.encode() not in payload:
        return None
    try:
        return json.loads(payload).get(STAMP)
    except (ValueError, AttributeError):
        return None


class MqttDecoder:
    """Cuts a byte stream into (packet type byte, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            mult, length, i = 1, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
                if i > 4:
                    raise ValueError("bad MQTT remaining length")
            if len(self.buf) < i + length:
                break
            out.append((self.buf[0], bytes(self.buf[i:i + length])))
            del self.buf[:i + length]
        if not self.buf:
            self.buf = bytearray()
        return out


