"""From rows to work: each row's request checked and completed (command-line and build defaults), its image
files read from the input's folder, then one Item per request and seed — named stably, fingerprinted so that a
re-run can tell done work from changed work — and Items grouped into runtime batches."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import RequestError, UserError
from ..manifest import Manifest, parse
from ..runtime.validate import SEED_MAX, Limits
from .inputs import Row, Template
from .requests import (BATCH_FIELDS, PATH_FIELDS, REQUEST_FIELDS, RowError, check, check_fields, check_model,
                       read_file, resolve_loras, typed)

MAX_SEEDS = 10_000  # images per request (--seeds)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class Options:
    """What the command line sets for every row."""

    input_dir: Path
    manifest: dict
    limits: Limits
    template: Template | None = None
    seed: int = 0
    seeds: int = 1
    defaults: dict = field(default_factory=dict)  # row fields the command line gives (steps, height, ...)
    allow_outside: bool = False
    runtime: dict = field(default_factory=dict)  # backend, cfg_mode: part of the fingerprint
    lora_dir: Path | None = None  # where rows' `loras` names are looked up (--lora-dir)

    @property
    def variant(self) -> str:
        return self.manifest["variant"]


@dataclass
class Item:
    """One image to make: a checked request and a seed."""

    line: int
    id: str | None
    seed: int
    output: str  # file name in the output folder
    request: dict  # the request as it runs (defaults filled in, image files named and hashed): results.jsonl
    call: dict  # keyword arguments of ZImageRuntime.generate besides prompt, seed, images and mask
    # {"images": [[absolute path, sha256], ...], "mask": [absolute path, sha256] | None, "control_image": the
    # same | None, "loras": [[name, scale, absolute path, sha256], ...]}
    files: dict
    fingerprint: str

    def group_key(self):
        """Items with equal keys can share one runtime call (text-to-image only, the same LoRAs)."""
        if self.files["images"] or self.files["mask"] or self.files["control_image"]:
            return None
        loras = [(sha, scale) for _, scale, _, sha in self.files["loras"]]
        return json.dumps([self.call, loras], sort_keys=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Item":
        return cls(**json.loads(text))


@dataclass
class Plan:
    items: list[Item]
    errors: list[dict]  # records for rows that did not become items


def build_key(manifest: Manifest | dict) -> str:
    """What identifies the build's numerics: variant, precision and, per component, what it runs: its precision,
    export key, the graph's content hash (quantized graphs differ from the exported one, whose key they share),
    the quantization's key and the engine's key and plan hash."""
    manifest = parse(manifest)
    comps = {name: [c.key, c.precision, c.onnx_sha256, c.quantization and c.quantization.key,
                    c.engine and c.engine.key, c.engine and c.engine.plan_sha256]
             for name, c in manifest.components.items()}
    return _sha({"variant": manifest.variant, "precision": manifest.precision, "components": comps})


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def check_columns(header: list[str], template: Template | None) -> None:
    """CSV: every column must be a request field, `id`, a file field or a template field (typos fail early)."""
    known = set(REQUEST_FIELDS) | set(BATCH_FIELDS) | set(template.fields if template else ())
    unknown = [h for h in header if h not in known]
    if unknown:
        raise UserError(f"--input: CSV columns {unknown} are neither request fields ({', '.join(REQUEST_FIELDS)}, "
                        f"{', '.join(BATCH_FIELDS)}) nor used by --template")
    if template:
        missing = [f for f in template.fields if f not in header]
        if missing:
            raise UserError(f"--template uses {missing}, which the CSV header does not name")
    elif "prompt" not in header:
        raise UserError("--input: the CSV header has no `prompt` column (or give --template)")


def make_plan(rows: list[Row], opts: Options) -> Plan:
    items, errors, taken = [], [], {}
    bkey = build_key(opts.manifest)
    for row in rows:
        try:
            if row.error:
                raise RowError(row.error)
            new = _row_items(row, opts, bkey)
            for item in new:  # case-insensitively: some file systems are
                if item.output.lower() in taken:
                    raise RowError(f"output {item.output} is already made by line {taken[item.output.lower()]} "
                                   "(ids must be unique)")
        except Exception as e:  # noqa: BLE001 - a row never stops the batch; RequestError: the row's fault
            extra = {"request": row.fields} if row.fields is not None else {}
            mine = isinstance(e, RequestError)  # RowError, and the validator's own (TooLarge, BadInput)
            errors.append(error_record(row.line, str(e) if mine else f"{type(e).__name__}: {e}",
                                       "input" if mine else "internal", id=(row.fields or {}).get("id"), **extra))
            continue
        for item in new:
            taken[item.output.lower()] = row.line
        items += new
    return Plan(items, errors)


def error_record(line: int, message: str, kind: str = "input", **extra) -> dict:
    rid = extra.pop("id", None)
    return {"line": line, "id": rid if isinstance(rid, str) else None, **extra, "status": "error",
            "error_kind": kind, "error": message}


def _row_items(row: Row, opts: Options, bkey: str) -> list[Item]:
    fields = typed(row.fields) if row.text else dict(row.fields)
    if opts.template:
        if "prompt" in fields and "prompt" not in opts.template.fields:
            raise RowError("the row has a prompt and --template does not use {prompt}: give one or the other")
        try:
            prompt = opts.template.fill(fields)
        except ValueError as e:
            raise RowError(str(e)) from None
        for name in opts.template.fields:
            if name not in REQUEST_FIELDS and name not in BATCH_FIELDS:
                fields.pop(name, None)
        fields["prompt"] = prompt
    rid = _row_id(fields.pop("id", None))
    paths = {k: fields.pop(k) for k in PATH_FIELDS if k in fields and fields[k] is not None}
    check_fields(fields)
    check_model(fields.pop("model", None), opts.variant)
    image_paths = _path_list(paths)
    images = [read_file(p, "image", opts.input_dir, opts.allow_outside) for p in image_paths]
    mask = read_file(paths["mask"], "mask", opts.input_dir, opts.allow_outside) if "mask" in paths else None
    control = read_file(paths["control_image"], "control_image", opts.input_dir, opts.allow_outside) \
        if "control_image" in paths else None
    loras = resolve_loras(fields.pop("loras", None), opts.lora_dir, row.text)
    # the size comes from the input image, unless a control image is given (then the images are resized to it)
    conditioned = (bool(images) or mask is not None) and control is None
    for k, v in opts.defaults.items():  # the command line fills what the row leaves out
        if v is None or k in fields or (conditioned and k in ("height", "width")):
            continue
        if k != "strength" or (images and control is None):
            fields[k] = v
    req = check(opts.limits, fields, images, mask, control)
    base = fields.get("seed")
    base = opts.seed if base is None else base
    if base + opts.seeds - 1 > SEED_MAX:
        raise RowError(f"seeds {base}..{base + opts.seeds - 1} go past the largest seed {SEED_MAX}")
    request = {"prompt": req.prompts[0], "negative_prompt": req.negative_prompt, "steps": req.steps,
               "height": req.height, "width": req.width, "guidance_scale": req.guidance_scale,
               "cfg_normalization": req.cfg_normalization, "cfg_truncation": req.cfg_truncation}
    if req.strength is not None:
        request["strength"] = req.strength
    if images:
        request.update(images=[f.given for f in images], images_sha256=[f.sha256 for f in images])
    if mask:
        request.update(mask=mask.given, mask_sha256=mask.sha256)
    if control:
        request.update(control_image=control.given, control_image_sha256=control.sha256,
                       controlnet_scale=req.controlnet_scale)
    if loras:
        request["loras"] = [{"name": name, "scale": scale, "sha256": sha} for name, scale, _, sha in loras]
    call = req.generate_kwargs(opts.variant)
    stem = rid or f"line{row.line:06d}"
    files = {"images": [[f.path, f.sha256] for f in images], "mask": [mask.path, mask.sha256] if mask else None,
             "control_image": [control.path, control.sha256] if control else None, "loras": loras}
    return [Item(row.line, rid, s, f"{stem}-seed{s}.png", request, call, files,
                 _sha({"request": request, "seed": s, "build": bkey, "runtime": opts.runtime}))
            for s in range(base, base + opts.seeds)]


def _row_id(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise RowError(f"id {str(value)[:120]!r} must be 1-100 letters, digits, '.', '_' or '-' (not starting with "
                       "'.', '_' or '-'): it names the output files")
    return value


def _path_list(paths: dict) -> list:
    if "image" in paths and "images" in paths:
        raise RowError("give `image` or `images`, not both")
    if "image" in paths:
        return [paths["image"]]
    value = paths.get("images", [])
    if not isinstance(value, list):
        raise RowError("`images` must be a list of file paths")
    return value


def group_cap(limits: Limits, guidance_scale: float) -> int:
    """The most requests one runtime call takes (the validator's: the engine profile's batch, which CFG as one
    batch-2B call counts twice)."""
    return max(1, limits.max_batch // (2 if guidance_scale > 0 and limits.cfg_doubles_batch else 1))


def make_groups(items: list[Item], batch_size: int, limits: Limits) -> list[list[Item]]:
    """Items in input order, compatible ones (same size, steps, guidance settings) gathered up to `batch_size`
    per group; image-conditioned items alone. The grouping does not change any image."""
    groups, open_ = [], {}
    for item in items:
        key = item.group_key()
        if key is None or batch_size == 1:
            groups.append([item])
            continue
        cap = min(batch_size, group_cap(limits, item.call["guidance_scale"]))
        group = open_.setdefault(key, [])
        if not group:
            groups.append(group)  # placed where its first item is
        group.append(item)
        if len(group) >= cap:
            del open_[key]
    return groups
