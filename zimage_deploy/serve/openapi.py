"""The request bodies in the OpenAPI description (`GET /openapi.json`): the handlers read raw bodies (limits
first, then schema.py's parsing), so FastAPI cannot infer them. Descriptive only: schema.py decides."""

from __future__ import annotations

_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_LORAS = {"type": "array", "items": {"type": "object", "properties": {"name": _STR, "scale": _NUM},
                                     "required": ["name"]}}
_COMMON = {"model": {**_STR, "description": "a model from GET /v1/models (default: the server's default model)"},
           "prompt": {**_STR, "description": "Chinese or English"}, "negative_prompt": _STR,
           "seed": {**_INT, "minimum": 0}, "steps": {**_INT, "minimum": 1},
           "guidance_scale": _NUM, "cfg_normalization": _NUM, "cfg_truncation": _NUM, "loras": _LORAS,
           "controlnet_scale": _NUM}
GENERATE = {"type": "object", "required": ["prompt"], "properties": {
    **_COMMON, "height": _INT, "width": _INT, "strength": _NUM,
    "images": {"type": "array", "items": {**_STR, "description": "base64 (or a data: URL)"}},
    "mask": {**_STR, "description": "base64; white = repaint"}, "control_image": _STR}}
_OPENAI = {**{k: v for k, v in _COMMON.items()}, "n": {**_INT, "minimum": 1},
           "size": {**_STR, "description": "WIDTHxHEIGHT or auto"}, "response_format": {"enum": ["b64_json"]},
           "output_format": {"enum": ["png", "jpeg", "webp"]}, "user": _STR}
GENERATIONS = {"type": "object", "required": ["prompt"], "properties": _OPENAI}
EDITS = {"type": "object", "required": ["prompt", "image"], "properties": {
    **_OPENAI, "strength": _NUM, "image": {"type": "string", "format": "binary"},
    "mask": {"type": "string", "format": "binary", "description": "transparent (or white) = edit"}}}
_ANSWER = {"200": {"description": "the images (base64)"}, "202": {"description": "the job, queued"},
           "4XX": {"description": "the request's fault: {\"error\": {...}}"},
           "503": {"description": "shutting down, or cancelled"}}


def _json(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": _ANSWER}


BODIES = {("POST", "/v1/generate"): _json(GENERATE), ("POST", "/v1/jobs"): _json(GENERATE),
          ("POST", "/v1/images/generations"): _json(GENERATIONS),
          ("POST", "/v1/images/edits"): {"requestBody": {"required": True, "content": {
              "multipart/form-data": {"schema": EDITS}}}, "responses": _ANSWER}}
