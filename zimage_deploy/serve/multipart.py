"""multipart/form-data from a body already read (and capped): parts counted and sized while parsing, before
anything is decoded. Synchronous: the server runs it off the event loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import ApiError


@dataclass
class Part:
    name: str
    data: bytearray = field(default_factory=bytearray)
    filename: str | None = None  # None: a text field

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    def text(self) -> str:
        if self.is_file:
            raise ApiError(400, f"`{self.name}` must be a text field, not a file upload")
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"`{self.name}` is not UTF-8 text") from None


def parse_multipart(content_type: str, body: bytes, max_files: int, max_fields: int, max_field_bytes: int,
                    max_file_bytes: int) -> list[Part]:
    """-> the parts in order. ApiError 400 for a malformed body, 413 for too many or too large parts."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ApiError(400, "multipart body without a valid boundary in its Content-Type")
    parts: list[Part] = []
    state = {"field": b"", "value": b"", "headers": {}, "files": 0, "fields": 0}

    def on_part_begin():
        state["headers"] = {}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, options = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if b"name" not in options:
            raise ApiError(400, "a multipart part has no name (Content-Disposition)")
        name = options[b"name"].decode("utf-8", "replace")[:100]
        filename = options.get(b"filename")
        if filename is not None:
            state["files"] += 1
            if state["files"] > max_files:
                raise ApiError(413, f"more than {max_files} files in the multipart body")
        else:
            state["fields"] += 1
            if state["fields"] > max_fields:
                raise ApiError(413, f"more than {max_fields} text fields in the multipart body")
        parts.append(Part(name, filename=None if filename is None else filename.decode("utf-8", "replace")))

    def on_part_data(data, start, end):
        part = parts[-1]
        limit = max_file_bytes if part.is_file else max_field_bytes
        if len(part.data) + end - start > limit:
            what = "file" if part.is_file else "text field"
            raise ApiError(413, f"{what} `{part.name}` is above its limit of {limit} bytes")
        part.data += data[start:end]

    ended = []
    callbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks, max_header_count=8, max_header_size=2048)
    except TypeError:  # python-multipart before its header limits: the body cap bounds the headers
        parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(400, f"malformed multipart body ({type(e).__name__})") from None
    if not ended:
        raise ApiError(400, "malformed multipart body (it ends before its closing boundary)")
    return parts
