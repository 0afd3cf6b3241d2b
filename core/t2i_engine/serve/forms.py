"""Reading a generation request's body: JSON, or a multipart form of a ``params`` JSON field and
image uploads, in memory, within ``task.max_upload_bytes`` (HTTP 413 beyond it).

The body is read whole into memory under the limit (never spooled to a temporary file), and
the parts are parsed there; a part's client-side file name is never looked at.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from t2i_engine.serve.requests import RequestError

__all__ = ["parse_body", "read_body"]

PARAMS_FIELD = "params"


async def read_body(stream: AsyncIterator[bytes], *, declared: str | None, limit: int) -> bytes:
    """The whole body, refusing (413) one that says or turns out to be over ``limit`` bytes."""
    too_big = RequestError(413, f"request body over {limit} bytes (task.max_upload_bytes)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _json(text: bytes | str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"{what}: not valid JSON ({exc})") from None


def _multipart(body: bytes, content_type: str, limit: int) -> tuple[Any, dict[str, bytes]]:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import create_form_parser

    fields: dict[str, bytes] = {}
    files: dict[str, bytes] = {}

    def on_field(field: Any) -> None:
        fields[(field.field_name or b"").decode("utf-8", "replace")] = field.value or b""

    def on_file(file: Any) -> None:
        file.file_object.seek(0)
        files[(file.field_name or b"").decode("utf-8", "replace")] = file.file_object.read()

    config = {"MAX_MEMORY_FILE_SIZE": limit + 1, "MAX_BODY_SIZE": limit, "UPLOAD_DIR": None}
    try:
        parser = create_form_parser({"Content-Type": content_type.encode("latin-1")}, on_field, on_file, config=config)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise RequestError(400, f"request: not a readable multipart form ({exc})") from None
    if PARAMS_FIELD not in fields:
        raise RequestError(400, f"request: the form has no '{PARAMS_FIELD}' field (the generation's JSON)")
    files = {name: data for name, data in files.items() if data}  # an empty file input: nothing chosen
    return _json(fields[PARAMS_FIELD], PARAMS_FIELD), files


def parse_body(body: bytes, content_type: str, *, limit: int) -> tuple[Any, dict[str, bytes]]:
    """``(params, uploads)`` of a request body: a JSON object, or ``multipart/form-data`` with a
    ``params`` field (the JSON) and image files named by upload field."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        return _json(body, "request"), {}
    if kind == "multipart/form-data":
        return _multipart(body, content_type, limit)
    raise RequestError(415, f"request: send application/json or multipart/form-data, not {kind or 'no content type'}")
