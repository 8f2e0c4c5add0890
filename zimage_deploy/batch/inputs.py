"""Reading a batch input file — JSONL (one request object per line), CSV (one request per row, a header naming
the fields) or plain text (one prompt per line) — into rows, and filling prompts from a `--template`.

Every row keeps the line it starts on (1-based, as an editor shows it): outputs are named after it. A line that
cannot be read (malformed JSON, not UTF-8, too long, a CSV row with too many cells) becomes a row with an error;
the others are read on. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError

FORMATS = ("jsonl", "csv", "text")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "text"}
MAX_LINE_CHARS = 1 << 20  # one request never needs more; a longer line is an error, not a memory spike
LIST_SEPARATOR = "|"  # CSV cells holding several paths (`images`)


@dataclass
class Row:
    line: int
    fields: dict | None  # JSON values; CSV cells as strings (empty cells left out)
    error: str | None = None
    text: bool = False  # the values are text (CSV): numbers still to be read


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UserError(f"--input-format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
        return fmt
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise UserError(f"--input {path}: cannot tell the format from {path.suffix or 'no suffix'!r} "
                        f"(.jsonl, .csv, .txt), pass --input-format") from None


def read_rows(path: Path, fmt: str) -> tuple[list[Row], list[str] | None]:
    """All rows of the file, and the CSV header (None for the other formats)."""
    if not path.is_file():
        raise UserError(f"--input {path} is not a file")
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            if fmt == "csv":
                return _csv_rows(f)
            return list(_jsonl_rows(f) if fmt == "jsonl" else _text_rows(f)), None
    except OSError as e:
        raise UserError(f"--input {path}: {e.strerror or e}") from None


def _lines(f) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text without the newline, error) for each line, reading at most MAX_LINE_CHARS of one."""
    number = 0
    while True:
        chunk = f.readline(MAX_LINE_CHARS + 1)
        if not chunk:
            return
        number += 1
        if len(chunk) > MAX_LINE_CHARS and chunk[-1] not in "\r\n":
            while chunk and chunk[-1] not in "\r\n":  # skip the rest of the line, in bounded pieces
                chunk = f.readline(MAX_LINE_CHARS)
            yield number, None, f"line longer than {MAX_LINE_CHARS} characters"
            continue
        text = chunk.rstrip("\r\n")
        if _not_utf8(text):
            yield number, None, "line is not valid UTF-8"
            continue
        yield number, text, None


def _not_utf8(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)  # surrogateescape'd bytes


def _no_constants(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text):
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range for a number")
    return value


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice")
        out[k] = v
    return out


def _jsonl_rows(f) -> Iterator[Row]:
    for number, text, error in _lines(f):
        if error or not text.strip():
            if error:
                yield Row(number, None, error)
            continue
        try:
            value = json.loads(text, parse_constant=_no_constants, parse_float=_finite,
                               object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so are huge integers
            yield Row(number, None, f"malformed JSON: {str(e)[:200]}")
            continue
        if not isinstance(value, dict):
            yield Row(number, None, f"each line must be a JSON object (a request), got {type(value).__name__}")
            continue
        yield Row(number, value)


def _text_rows(f) -> Iterator[Row]:
    for number, text, error in _lines(f):
        if error:
            yield Row(number, None, error)
        elif text.strip():
            yield Row(number, {"prompt": text.strip()})


def _csv_rows(f) -> tuple[list[Row], list[str]]:
    csv.field_size_limit(MAX_LINE_CHARS)
    reader = csv.reader(f, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise UserError(f"--input: unreadable CSV header ({e})") from None
    if not header:
        raise UserError("--input: the CSV file is empty (it needs a header row naming the fields)")
    header = [h.strip() for h in header]
    if any(not h for h in header) or any(_not_utf8(h) for h in header):
        raise UserError(f"--input: the CSV header has an empty or non-UTF-8 column name: {header}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise UserError(f"--input: CSV columns named twice: {dupes}")
    rows, last = [], reader.line_num
    while True:
        start = last + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(Row(start, None, f"malformed CSV row: {e}"))
            last = reader.line_num
            continue
        last = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            rows.append(Row(start, None, f"{len(cells)} cells but the header names {len(header)} columns"))
        elif any(_not_utf8(c) for c in cells):
            rows.append(Row(start, None, "row is not valid UTF-8"))
        else:
            fields = {h: c.strip() for h, c in zip(header, cells) if c.strip()}
            if isinstance(fields.get("images"), str):
                fields["images"] = [p.strip() for p in fields["images"].split(LIST_SEPARATOR)]
            rows.append(Row(start, fields, text=True))
    return rows, header


class Template:
    """`--template "a poster of {product}, {style}"`: str.format with named fields only (no attributes, indexes,
    conversions or format specs: values are pasted in as they are). `{{` and `}}` are literal braces."""

    def __init__(self, text: str):
        self.text = text
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise UserError(f"--template {text!r}: {e}") from None
        names = []
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise UserError(f"--template: {{{name}{'!' + conversion if conversion else ''}"
                                f"{':' + spec if spec else ''}}} is not a plain field name like {{product}}")
            names.append(name)
        self.fields = tuple(dict.fromkeys(names))

    def fill(self, values: dict) -> str:
        """The prompt for one row; raises ValueError naming a missing or unusable field."""
        filled = {}
        for name in self.fields:
            v = values.get(name)
            if v is None or v == "":
                raise ValueError(f"the template's field {name!r} is missing or empty in this row")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ValueError(f"the template's field {name!r} must be text or a number, got "
                                 f"{type(v).__name__}")
            filled[name] = v
        return self.text.format(**filled)
