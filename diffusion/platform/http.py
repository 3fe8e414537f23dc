"""The Serve application's HTTP edge, apart from the model: the guard every request body passes
before FastAPI reads it, the 422 that names each bad field, and the image encodings.

    harden(app)        ApiKeyGuard (401 without the key, when one is required), BodyGuard (415, 413,
                       400 for what is not JSON, 422 for JSON nested too deep, before any field is
                       looked at) and the 422 handler; both are plain
                       ASGI and pass responses on as sent (an event stream event by event)
    encode(images)     a PNG grid, an npz of the array, or JSON of base64 PNGs (`images_json`)
    sse(event, data)   one Server-Sent Event with JSON data
    decode_png(data)   an uploaded PNG, its size checked before a pixel is decoded
"""

from __future__ import annotations

import base64
import hmac
import io
import json

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image

from ..errors import excerpt
from ..images import from_uint8, save_grid
from .settings import key_sha256

MAX_UPLOAD_BYTES = 1 << 20  # per uploaded image (base64-decoded)
MAX_BODY_BYTES = 4 << 20  # two base64 uploads and the rest
MAX_NESTING = 32  # JSON levels; a request needs 3


def harden(app: FastAPI) -> FastAPI:
    """`app` with the key guard, the body guard and the field-naming 422 handler."""
    app.add_middleware(BodyGuard)
    app.add_middleware(ApiKeyGuard)  # added last: the outermost, before a byte of the body is read
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


def body_problem(body: bytes) -> tuple[int, str] | None:
    """(status, message) when a JSON body is unusable before any field is looked at, else None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return 400, f"the body is not UTF-8 text: byte {body[e.start]:#04x} at position {e.start}"

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite(literal: str) -> float:
        value = float(literal)
        if not np.isfinite(value):
            raise ValueError(f"the number {literal[:20]} is out of range")
        return value

    try:
        value = json.loads(text, parse_constant=refuse_constant, parse_float=finite)
    except RecursionError:
        return 422, f"the body nests deeper than {MAX_NESTING} levels"
    except json.JSONDecodeError as e:
        return 400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except ValueError as e:  # a refused constant, a number out of range, an integer of too many digits
        return 400, f"the body is not valid JSON: {e}"
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        depth = max(depth, d)
        if depth > MAX_NESTING:
            return 422, f"the body nests deeper than {MAX_NESTING} levels"
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        level.extend((child, d + 1) for child in children)
    return None


class ApiKeyGuard:
    """ASGI middleware: where this process requires a key (`ApiKeyGuard.sha256`, set by the
    replica), every request must send it as `Authorization: Bearer KEY`, else 401. Only the key's
    SHA-256 is held, and compared in constant time."""

    sha256 = ""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ApiKeyGuard.sha256 and not self.authorized(dict(scope["headers"])):
            detail = "this endpoint needs its API key: send the header `Authorization: Bearer KEY`"
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def authorized(headers: dict) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        digest = key_sha256(key.strip())
        return scheme.lower() == "bearer" and bool(digest) and hmac.compare_digest(digest, ApiKeyGuard.sha256)


class BodyGuard:
    """ASGI middleware: every POST body, before FastAPI reads it, is JSON under its content type
    (415), at most `max_bytes` long (413, without reading further), UTF-8 and JSON with finite
    numbers (400), nested at most MAX_NESTING deep (422); each refusal names the problem."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        media_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media_type != "application/json":
            detail = f"the body must be JSON sent as Content-Type: application/json, got {media_type or 'none'!r}"
            return await self.refuse(scope, send, 415, f"{detail} (curl: -H 'content-type: application/json')")
        declared = headers.get(b"content-length", b"0").decode("latin-1")
        too_large = f"the body is larger than {self.max_bytes} bytes"
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(scope, send, 413, too_large)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.refuse(scope, send, 413, too_large)
            more = message.get("more_body", False)
        problem = body_problem(bytes(body))
        if problem:
            return await self.refuse(scope, send, *problem)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def refuse(scope, send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, None, send)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, with at most a short excerpt of what was sent (always JSON); a
    rule between fields (a request's own check) in its own words, without the request echoed."""
    problems = []
    for error in exc.errors()[:10]:
        field = ".".join(str(part) for part in error["loc"] if part != "body")
        if not field and error["type"] == "value_error":
            problems.append(str(error["ctx"]["error"]))  # pydantic's text is "Value error, " and the message
            continue
        got = f" (got {excerpt(error['input'])})" if "input" in error and error["type"] != "missing" else ""
        problems.append(f"{field or 'body'}: {error['msg']}{got}")
    return JSONResponse({"detail": problems}, status_code=422)


def encode(images: np.ndarray, fmt: str, headers: dict) -> Response:
    """uint8 (N, H, W, C) as one PNG grid, an npz of the array, or JSON of base64 PNGs."""
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, images=images)
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    if fmt == "json":
        return Response(json.dumps(images_json(images, headers)), media_type="application/json", headers=headers)
    buf = io.BytesIO()
    save_grid(from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2)), buf)
    return Response(buf.getvalue(), media_type="image/png", headers=headers)


def images_json(images: np.ndarray, headers: dict) -> dict:
    """uint8 (N, H, W, C) as {"images": [base64 PNG, ...]} with the response headers' information."""
    pngs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image.squeeze()).save(buf, format="PNG")  # (H, W) for grey
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    return {"images": pngs, **headers}


def sse(event: str, data: dict) -> bytes:
    """One Server-Sent Event: its name and its data as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def decode_png(data: str, shape: tuple[int, int, int], field: str) -> torch.Tensor:
    """An uploaded PNG as a model input; its size is read from the header and checked before a
    pixel is decoded (a small file can declare a huge image)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise HTTPException(422, f"{field}: not valid base64") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{field}: image larger than {MAX_UPLOAD_BYTES} bytes")
    channels, size, _ = shape
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])  # reads the header only
    except Exception:  # noqa: BLE001 - PIL raises many types
        raise HTTPException(422, f"{field}: not a PNG image") from None
    if image.size != (size, size):
        raise HTTPException(422, f"{field}: image is {image.size[0]}x{image.size[1]}, the model needs {size}x{size}")
    try:
        pixels = np.asarray(image.convert("RGB" if channels == 3 else "L")).reshape(size, size, channels)
    except Exception:  # noqa: BLE001
        raise HTTPException(422, f"{field}: not a decodable PNG image") from None
    return from_uint8(torch.from_numpy(pixels).permute(2, 0, 1))
