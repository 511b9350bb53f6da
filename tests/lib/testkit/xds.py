"""A raw client's view of the control plane's xDS port: just enough
protobuf to write an ECDS DiscoveryRequest (a subscription, an ACK or a NACK)
and read the fields of a DiscoveryResponse, for tests that play a stranger
on the port (no gRPC library: the tests send exactly the bytes they mean)."""

from __future__ import annotations

import struct

TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
STREAM_PATH = "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs"
FETCH_PATH = "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/FetchExtensionConfigs"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(value)) + value


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def fields(message: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (the last of each)."""
    out, i = {}, 0
    while i < len(message):
        key, i = read_varint(message, i)
        if key & 7 == 2:
            n, i = read_varint(message, i)
            out[key >> 3] = message[i:i + n]
            i += n
        elif key & 7 == 0:
            _, i = read_varint(message, i)
        else:
            raise AssertionError(f"unexpected wire type {key & 7}")
    return out


def discovery_request(node: str, nonce: bytes = b"", error: str = "") -> bytes:
    """A DiscoveryRequest (node, resource name, type URL; with `nonce` an
    answer to that response, a NACK with `error`) as a gRPC message."""
    message = field(2, field(1, node.encode())) + field(3, b"apitokens") + field(4, TYPE_URL.encode())
    if nonce:
        message += field(5, nonce)
    if error:
        # error_detail: a google.rpc.Status (code 3, INVALID_ARGUMENT, and a message).
        message += field(6, varint(1 << 3) + varint(3) + field(2, error.encode()))
    return b"\0" + struct.pack(">I", len(message)) + message
