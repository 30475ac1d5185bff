"""Reading request bodies: JSON (whatever the content type says, as clip-retrieval's clients send it) or a
multipart form with image files; base64 images; decoding images with the decompression-bomb guard."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import typing
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

M = TypeVar("M", bound=BaseModel)
IMAGE_FIELDS = ("image", "images")
# Every request body is flat (an object of strings, numbers and lists of them), so 32 levels is far more than
# any client needs, and far less than the depth at which Python's JSON parser runs out of stack.
MAX_JSON_DEPTH = 32
_STEP = np.zeros(256, np.int8)  # byte -> change of nesting depth
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


class BadRequest(ValueError):
    """A request the client must fix (answered 400 with the message)."""


def nests_too_deeply(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Do [ and { nest deeper than `limit` outside strings? Found in C-speed passes over the bytes.

    Escaped backslashes go first, then escaped quotes, so every quote left opens or closes a string; of the
    rest only quotes and brackets matter. For a body that is not valid JSON the answer is a guess, which is
    fine: the parser refuses that body anyway."""
    s = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    if s.count(b"[") + s.count(b"{") <= limit:
        return False  # too few brackets to nest that deep: no arrays needed
    a = np.frombuffer(s, np.uint8)
    in_string = np.logical_xor.accumulate(a == ord('"'))  # True from an opening quote to its closing one
    step = np.where(in_string, 0, _STEP[a])
    return int(np.cumsum(step, dtype=np.int32).max()) > limit


def parse_json(data: bytes | str, what: str = "the request body") -> Any:
    """JSON text -> value, refusing (BadRequest) what is not standard JSON (NaN and Infinity included) and
    anything nested deeper than MAX_JSON_DEPTH, before the recursive parser meets it."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if nests_too_deeply(raw):
        raise BadRequest(f"{what} nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # a body whose encoding hid its brackets from nests_too_deeply (UTF-16, say)
        raise BadRequest(f"{what} nests arrays or objects too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_object(raw: bytes) -> dict:
    """The request body as a JSON object (whatever the content type says)."""
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _errors(e: ValidationError) -> list[dict]:
    return [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(_errors(e)) from None


def _is_list_field(model: type[BaseModel], name: str) -> bool:
    ann = model.model_fields[name].annotation
    return any(a is list or typing.get_origin(a) is list for a in (ann, *typing.get_args(ann)))


def _form_list(values: list[str]) -> list[str]:
    """A list field in a form: repeated fields, one JSON array, or one comma- or newline-separated string."""
    if len(values) != 1:
        return values
    v = values[0].strip()
    if v.startswith("["):
        try:
            parsed = parse_json(v, "a form field")
        except BadRequest:
            parsed = None  # not a JSON array after all: read it as comma-separated text
        if isinstance(parsed, list):
            return [str(x) for x in parsed]
    sep = "\n" if "\n" in v else ","
    return [part.strip() for part in v.split(sep) if part.strip()]


async def read_body(request: Request, model: type[M], max_files: int) -> tuple[M, list[bytes]]:
    """The validated body and any uploaded files (multipart field `image` or `images`)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return await _read_form(request, model, max_files)
    return validate(model, json_object(await request.body())), []


async def _read_form(request: Request, model: type[M], max_files: int) -> tuple[M, list[bytes]]:
    try:
        form = await request.form(max_files=max_files, max_fields=1000)
    except HTTPException:
        raise  # Starlette's own 400 for a malformed form
    except Exception as e:  # the multipart parser's errors: malformed boundaries, too many parts, ...
        raise BadRequest(f"malformed multipart form: {getattr(e, 'detail', None) or e}") from None
    files: list[bytes] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            if key not in IMAGE_FIELDS:
                raise BadRequest(f"unexpected file field {key!r}; send images as 'image'")
            files.append(await value.read())
        else:
            fields.setdefault(key, []).append(str(value))
    data: dict[str, Any] = {}
    for key, values in fields.items():
        if key in model.model_fields and _is_list_field(model, key):
            data[key] = _form_list(values)
        else:
            data[key] = values[0] if len(values) == 1 else values
    return validate(model, data), files


def b64decode(value: str, what: str) -> bytes:
    """Base64 (standard or URL-safe, padding optional, a `data:...;base64,` prefix allowed) -> bytes."""
    s = value.strip()
    if s.startswith("data:"):
        s = s.partition(",")[2]
    s = "".join(s.split()).replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    if not data:
        raise BadRequest(f"{what} is empty")
    return data


async def decode_image(data: bytes, what: str, max_pixels: int) -> tuple[Any, str]:
    """bytes -> (RGB PIL image, format name). Raises ImageError (a ValueError) for non-images and for images
    over `max_pixels`, judged from the header before any pixel is decoded."""
    from PIL import Image

    from clipforge.transforms import load_image

    def run() -> tuple[Any, str]:
        import io

        img = load_image(data, max_pixels=max_pixels, name=what)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or "PNG"
        except Image.UnidentifiedImageError:  # decoded outside Pillow: a camera RAW read by rawpy
            fmt = "RAW"
        return img, fmt

    return await asyncio.to_thread(run)
