"""Batch production (`python -m zimage_deploy.batch`) on the tiny fp32 builds at 64x64 and 2-4 steps: every input
format and template filling, bad lines recorded while the batch goes on, resumption after a killed run, images
identical to `generate` / `ZImageRuntime.generate` whatever the grouping, img2img / inpaint / Edit rows, and the
Ray Data path with two CPU actors."""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import need, synthetic_image
from zimage_deploy.cli import run_cli

SIZE = dict(height=64, width=64)


def batch(*args) -> int:
    from zimage_deploy.batch.job import main

    return run_cli(lambda: main([str(a) for a in args] + ["--no-progress"]))


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def pixels(path_or_image) -> np.ndarray:
    im = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(im.convert("RGB")).astype(int)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n")
    return path


@pytest.fixture(scope="module")
def runtime(tiny_fp32):
    from zimage_deploy import ZImageRuntime

    return ZImageRuntime(tiny_fp32)


def reference(runtime, prompt, seed, steps=2, **kw):
    return pixels(runtime.generate(prompt, seed=seed, steps=steps, **{**SIZE, **kw}).images[0])


PROMPTS = ["a red fox in the snow, watercolor", "一只橘猫在窗台上晒太阳", "a lighthouse at dusk",
           "a poster of a bicycle, " * 20, "x"]


# -- formats, templates, defaults ---------------------------------------------------------------------------
def test_jsonl_csv_text_and_templates(tmp_path, tiny_fp32, runtime):
    src = tmp_path / "in"
    write_jsonl(src / "a.jsonl", [{"prompt": "a red fox", "seed": 3, "steps": 2, **SIZE},
                                  {"id": "cat", "prompt": "a cat", "steps": 2, **SIZE}])
    assert batch("--engine-dir", tiny_fp32, "--input", src / "a.jsonl", "--out", tmp_path / "j", "--seeds", 2) == 0
    got = {r["output"]: r for r in results(tmp_path / "j")}
    assert sorted(got) == ["cat-seed0.png", "cat-seed1.png", "line000001-seed3.png", "line000001-seed4.png"]
    for name, prompt, seed in (("line000001-seed4.png", "a red fox", 4), ("cat-seed1.png", "a cat", 1)):
        assert np.array_equal(pixels(tmp_path / "j" / name), reference(runtime, prompt, seed))
        assert got[name]["seed"] == seed and got[name]["request"]["prompt"] == prompt
        assert got[name]["sha256"] == sha(tmp_path / "j" / name) and got[name]["status"] == "ok"
        assert set(got[name]["timings"]) >= {"encode", "denoise", "decode", "write"}

    # CSV filled through --template; a quoted cell with a comma and a newline; CLI defaults for size and steps
    with open(src / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "product", "style", "seed"])
        w.writerow(["p1", "a bicycle", "flat colours, bold", "11"])
        w.writerow(["p2", "a teapot", "ink\nwash", ""])
    template = "a poster of {product}, {style}"
    assert batch("--engine-dir", tiny_fp32, "--input", src / "p.csv", "--out", tmp_path / "c", "--template",
                 template, "--seed", 7, "--steps", 2, "--height", 64, "--width", 64) == 0
    recs = {r["id"]: r for r in results(tmp_path / "c")}
    assert recs["p1"]["request"]["prompt"] == "a poster of a bicycle, flat colours, bold" and recs["p1"]["seed"] == 11
    assert recs["p2"]["request"]["prompt"] == "a poster of a teapot, ink\nwash" and recs["p2"]["seed"] == 7
    assert recs["p2"]["line"] == 3  # the line the row starts on
    assert np.array_equal(pixels(tmp_path / "c" / "p2-seed7.png"),
                          reference(runtime, "a poster of a teapot, ink\nwash", 7))

    # plain text, one prompt per line (blank lines skipped), {prompt} in a template; steps from the build
    (src / "t.txt").write_text("a castle\n\n  a boat  \n")
    assert batch("--engine-dir", tiny_fp32, "--input", src / "t.txt", "--out", tmp_path / "t", "--template",
                 "{prompt}, oil painting", "--height", 64, "--width", 64) == 0
    recs = results(tmp_path / "t")
    assert [(r["line"], r["request"]["prompt"]) for r in recs] == [(1, "a castle, oil painting"),
                                                                  (3, "a boat, oil painting")]
    default_steps = json.loads((tiny_fp32 / "manifest.json").read_text())["defaults"]["steps"]
    assert recs[1]["request"]["steps"] == default_steps
    assert np.array_equal(pixels(tmp_path / "t" / "line000003-seed0.png"),
                          reference(runtime, "a boat, oil painting", 0, steps=default_steps))
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["failures"] == 0 and summary["images_per_s"] > 0


def test_command_errors(tmp_path, tiny_fp32, capsys):
    """Each bad command exits 2 with one `error:` line saying what is wrong, before anything runs."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "p.csv").write_text("prompt,heigth\na cat,64\n")
    (src / "q.csv").write_text("product\nbike\n")
    (src / "s.csv").write_text("steps\n2\n")
    (src / "t.txt").write_text("a cat\n")
    base = ("--engine-dir", tiny_fp32, "--out", tmp_path / "o")

    def refused(*args, says: str):
        assert batch(*args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and says in lines[0], err

    refused(*base, "--input", src / "p.csv", says="CSV columns ['heigth'] are neither request fields")
    refused(*base, "--input", src / "q.csv", says="CSV columns ['product'] are neither request fields")
    refused(*base, "--input", src / "s.csv", says="the CSV header has no `prompt` column (or give --template)")
    refused(*base, "--input", src / "q.csv", "--template", "{product} in {colour}",
            says="--template uses ['colour'], which the CSV header does not name")
    refused(*base, "--input", src / "t.txt", "--template", "{prompt} {style}",
            says="a text file gives each line as {prompt} only")
    for bad in ("{0}", "{a.b}", "{a[0]}", "{a!r}", "{a:>10}"):
        refused(*base, "--input", src / "q.csv", "--template", bad, says=f"--template: {bad} is not a plain field name")
    refused(*base, "--input", src / "q.csv", "--template", "{", says="Single '{' encountered")
    refused(*base, "--input", src / "t.txt", "--seeds", 0, says="--seeds must be between 1 and 10000, got 0")
    refused(*base, "--input", src / "t.txt", "--seeds", 10**9, says="--seeds must be between 1 and 10000")
    refused(*base, "--input", src / "t.txt", "--height", 100, says="height must be a positive multiple of 16")
    refused(*base, "--input", src / "t.txt", "--steps", 10**9, says="steps must be in 1..100")
    refused(*base, "--input", src / "t.txt", "--seed", 2**64, says=f"--seed must be between 0 and {2**63 - 1}")
    refused(*base, "--input", src / "t.txt", "--strength", 1.5, says="--strength must be in (0, 1], got 1.5")
    refused(*base, "--input", src / "missing.jsonl", says="missing.jsonl is not a file")
    refused(*base, "--input", src / "t.unknown", says="t.unknown: cannot tell the format from '.unknown'")
    refused("--engine-dir", tmp_path, "--out", tmp_path / "o", "--input", src / "t.txt", says="has no manifest.json: build it first")
    assert not list((tmp_path / "o").glob("*.png"))


# -- bad lines ----------------------------------------------------------------------------------------------
def test_bad_lines_are_recorded_and_the_batch_goes_on(tmp_path, tiny_fp32, runtime):
    src = tmp_path / "in"
    (src / "imgs").mkdir(parents=True)
    synthetic_image(64, 64).save(src / "imgs" / "ok.png")
    synthetic_image(528, 64).save(src / "imgs" / "wide.png")  # output would be 528 px: over the build's 512
    (src / "imgs" / "text.png").write_text("not an image")
    synthetic_image(64, 64).save(tmp_path / "outside.png")
    ok = {"steps": 2, **SIZE}
    bad = [  # (line, part of the recorded error)
        ({"prompt": "x", "height": 100, "width": 64}, "multiple of 16"),
        ("{oops", "malformed JSON"),
        ({"prompt": "p" * 12_000}, "prompt is 12000 characters"),
        ({"prompt": "x", "height": 10**12}, "height"),
        ({"prompt": "x", "width": 528}, "largest side"),
        ({"prompt": "x", "steps": 10**9}, "steps must be in"),
        ({"prompt": "x", "steps": 2.5}, "steps must be an integer"),
        ({"prompt": "x", "seed": 2**70}, "seed must be in"),
        ({"prompt": "x", "seed": -1}, "seed must be in"),
        ({"prompt": "x", "seed": "1"}, "seed must be an integer"),
        ({"prompt": "x", "guidance_scale": 1e308}, "guidance_scale must be in"),
        ('{"prompt": "x", "guidance_scale": 1e999}', "out of range"),
        ('{"prompt": "x", "cfg_truncation": NaN}', "NaN"),
        ('{"prompt": "x", "steps": ' + "9" * 5000 + "}", "malformed JSON"),
        ('{"prompt": "x", "prompt": "y"}', "twice"),
        ("[1, 2]", "JSON object"),
        ("[" * 100_000, "malformed JSON"),
        ({"prompt": "x", "colour": "red"}, "unknown field `colour`"),
        ({"prompt": "x", "model": "base"}, "this batch runs one turbo build"),
        ({"prompt": "x", "model": ["turbo"]}, "this batch runs one turbo build"),
        ({"prompt": "x", "model": "t" * 10_000}, "this batch runs one turbo build"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": ["a", "b"]}, "prompt must be a string"),
        ({"steps": 2}, "prompt is required"),
        ({"prompt": "x", "negative_prompt": "n" * 12_000, "guidance_scale": 2}, "negative_prompt is 12000"),
        ({"prompt": "x", "negative_prompt": "ugly"}, "needs classifier-free guidance"),
        ({"prompt": "x", "image": "../outside.png"}, "outside the input file's folder"),
        ({"prompt": "x", "image": str(tmp_path / "outside.png")}, "outside the input file's folder"),
        ({"prompt": "x", "image": "imgs/../../outside.png"}, "outside the input file's folder"),
        ({"prompt": "x", "image": "imgs/text.png"}, "not an image this build reads"),
        ({"prompt": "x", "image": "imgs/missing.png"}, "no such file"),
        ({"prompt": "x", "image": "imgs/wide.png"}, "largest side"),
        ({"prompt": "x", "image": "imgs/ok.png", "images": ["imgs/ok.png"]}, "not both"),
        ({"prompt": "x", "images": "imgs/ok.png"}, "list"),
        ({"prompt": "x", "image": 5}, "file path"),
        ({"prompt": "x", "strength": 0.5}, "strength needs an input image"),
        ({"prompt": "x", "mask": "imgs/ok.png"}, "inpainting needs an input image"),
        ({"prompt": "x", "image": "imgs/ok.png", "strength": 0}, "strength must be in"),
        ({"prompt": "x", "id": "../evil"}, "id"),
        ({"prompt": "x", "id": "dup", **ok}, None),
        ({"prompt": "x", "id": "dup", **ok}, "already made by line"),
        (b"\xff\xfe{}", "UTF-8"),
        ('{"prompt": "' + "x" * (1 << 20) + '"}', "longer than"),
    ]
    good = [({"prompt": PROMPTS[0], **ok}, None), ({"prompt": "x", "image": "imgs/ok.png", "steps": 2,
                                                    "model": "z-image-turbo"}, None)]
    lines = [good[0]] + bad + [good[1]]
    write_jsonl(src / "in.jsonl", [row for row, _ in lines])
    out = tmp_path / "out"
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.jsonl", "--out", out) == 1
    recs = results(out)
    by_line = {}
    for r in recs:
        by_line.setdefault(r["line"], []).append(r)
    assert sorted(by_line) == list(range(1, len(lines) + 1))  # one record per line, none lost
    for number, (row, expected) in enumerate(lines, 1):
        (rec,) = by_line[number]
        if expected is None:
            assert rec["status"] == "ok", (number, rec)
            assert (out / rec["output"]).is_file()
        else:
            assert rec["status"] == "error" and expected in rec["error"], (number, expected, rec["error"][:300])
            assert "Traceback" not in rec["error"]
    assert np.array_equal(pixels(out / "line000001-seed0.png"), reference(runtime, PROMPTS[0], 0))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == len(bad) - 1 and summary["images"] == 3

    # --allow-outside lets the rows name files outside the input's folder
    write_jsonl(src / "out.jsonl", [{"prompt": "x", "image": "../outside.png", "steps": 2}])
    assert batch("--engine-dir", tiny_fp32, "--input", src / "out.jsonl", "--out", tmp_path / "o2",
                 "--allow-outside") == 0


def test_csv_bad_rows(tmp_path, tiny_fp32):
    (tmp_path / "p.csv").write_text('product,steps,height,width\nbike,2,64,64\n,2,64,64\nbike,2,64,64,extra\n'
                                    'bike,two,64,64\n"unclosed,2,64,64\n')
    out = tmp_path / "out"
    assert batch("--engine-dir", tiny_fp32, "--input", tmp_path / "p.csv", "--out", out, "--template",
                 "a {product}") == 1
    recs = {r["line"]: r for r in results(out)}
    assert recs[2]["status"] == "ok"
    assert "missing or empty" in recs[3]["error"]
    assert "cells" in recs[4]["error"]
    assert "steps must be an integer, got 'two'" in recs[5]["error"]
    assert recs[6]["status"] == "error"


def test_failing_request_in_a_group_fails_alone():
    """A group whose runtime call fails is run again item by item: only the bad request fails."""
    from zimage_deploy.batch.execute import run_group
    from zimage_deploy.batch.plan import Item
    from zimage_deploy.errors import RequestError

    class Runtime:
        calls = []

        def generate(self, prompts, seed, **kw):
            self.calls.append(list(prompts))
            if "bad" in prompts:
                raise RequestError("bad prompt")
            from zimage_deploy.runtime.api import GenerationResult

            return GenerationResult([Image.new("RGB", (16, 16), (s % 256, 0, 0)) for s in seed], list(seed), {})

    def item(line, prompt):
        call = dict(negative_prompt=None, steps=2, guidance_scale=0.0, cfg_normalization=0.0, cfg_truncation=1.0,
                    height=64, width=64)
        return Item(line, None, line, f"line{line:06d}-seed{line}.png", {"prompt": prompt, **call}, call,
                    {"images": [], "mask": None, "control_image": None, "loras": []}, "f")

    rt = Runtime()
    outcomes = run_group(rt, [item(1, "a"), item(2, "bad"), item(3, "c")])
    assert [r["status"] for r, _ in outcomes] == ["ok", "error", "ok"]
    assert outcomes[1][0]["error"] == "bad prompt" and outcomes[1][1] is None
    assert rt.calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


# -- identical images ---------------------------------------------------------------------------------------
def test_images_identical_to_generate_whatever_the_grouping(tmp_path, tiny_fp32, runtime):
    from zimage_deploy import ZImageRuntime, generate

    rows = [{"prompt": p, "seed": 10 + i, "steps": 2, **SIZE} for i, p in enumerate(PROMPTS)]
    rows.insert(2, {"prompt": "a tall one", "seed": 3, "steps": 2, "height": 96, "width": 64})  # another group
    write_jsonl(tmp_path / "in.jsonl", rows)
    outs = {}
    for bs in (1, 2, 3, 4):
        out = tmp_path / f"b{bs}"
        assert batch("--engine-dir", tiny_fp32, "--input", tmp_path / "in.jsonl", "--out", out,
                     "--batch-size", bs) == 0
        recs = results(out)
        assert max(r["batch_size"] for r in recs) == min(bs, len(PROMPTS))
        outs[bs] = {r["output"]: pixels(out / r["output"]) for r in recs}
    for bs in (2, 3, 4):
        for name, image in outs[1].items():
            assert np.array_equal(image, outs[bs][name]), (bs, name)
    for number, row in enumerate(rows, 1):
        name = f"line{number:06d}-seed{row['seed']}.png"
        ref = runtime.generate(row["prompt"], seed=row["seed"], steps=2, height=row["height"], width=row["width"])
        assert np.array_equal(outs[4][name], pixels(ref.images[0])), name
    for number in (1, 3):  # and the generate command itself
        row = rows[number - 1]
        cli_out = tmp_path / f"gen{number}.png"
        assert generate.main(["--engine-dir", str(tiny_fp32), "--prompt", row["prompt"], "--seed", str(row["seed"]),
                              "--steps", "2", "--height", str(row["height"]), "--width", str(row["width"]),
                              "--output", str(cli_out)]) == 0
        assert np.array_equal(outs[3][f"line{number:06d}-seed{row['seed']}.png"], pixels(cli_out))
    assert not np.array_equal(outs[1]["line000001-seed10.png"], outs[1]["line000002-seed11.png"])
    # the Torch backend's batched kernels round differently from its batch-1 ones (within 1/255): its default
    # batch size is 1, which makes `generate`'s images bit for bit; --batch-size 4 is the user's choice
    torch_outs = {}
    for bs in (None, 4):
        out = tmp_path / f"torch{bs}"
        extra = () if bs is None else ("--batch-size", bs)
        assert batch("--engine-dir", tiny_fp32, "--input", tmp_path / "in.jsonl", "--out", out, *extra,
                     "--backend", "torch") == 0
        assert max(r["batch_size"] for r in results(out)) == (bs or 1)
        torch_outs[bs] = {r["output"]: pixels(out / r["output"]) for r in results(out)}
    default = tmp_path / "default"  # and ONNX Runtime's default groups
    assert batch("--engine-dir", tiny_fp32, "--input", tmp_path / "in.jsonl", "--out", default) == 0
    assert max(r["batch_size"] for r in results(default)) == 4
    torch_rt = ZImageRuntime(tiny_fp32, backend="torch")
    for number, row in enumerate(rows, 1):
        name = f"line{number:06d}-seed{row['seed']}.png"
        ref = torch_rt.generate(row["prompt"], seed=row["seed"], steps=2, height=row["height"], width=row["width"])
        assert np.array_equal(torch_outs[None][name], pixels(ref.images[0])), name
        assert np.abs(torch_outs[None][name] - torch_outs[4][name]).max() <= 1, name
        assert np.abs(torch_outs[None][name] - outs[1][name]).max() <= 2, name  # and close to ONNX Runtime's


# -- resumption ---------------------------------------------------------------------------------------------
def test_resume_after_kill_and_changed_rows(tmp_path, tiny_fp32):
    rows = [{"prompt": f"a poster of product {i}", "steps": 4, **SIZE} for i in range(60)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    ref = tmp_path / "ref"
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", ref) == 0

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zimage_deploy.batch", "--engine-dir", str(tiny_fp32), "--input", str(src),
           "--out", str(out), "--batch-size", "1", "--no-progress"]

    def interrupt(sig, records: int) -> int:
        """Start the job, send `sig` once results.jsonl holds `records` lines; -> the exit code."""
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                log = out / "results.jsonl"
                if log.is_file() and log.read_text().count("\n") >= records:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the job ended before it could be interrupted"
            os.kill(proc.pid, sig)
        finally:
            proc.wait(60)
        return proc.returncode

    # SIGTERM (a cancelled CI job): exit 130, results.jsonl rewritten in order, the summary says so
    assert interrupt(signal.SIGTERM, 2) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 2 <= summary["images"] < len(rows)
    assert [r["line"] for r in results(out)] == list(range(1, summary["images"] + 1))
    # SIGKILL: no chance to tidy up
    assert interrupt(signal.SIGKILL, summary["images"] + 3) == -signal.SIGKILL
    done = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert summary["images"] + 3 <= len(done) < len(rows)
    for r in done:  # a record never names a missing or partial image
        assert sha(out / r["output"]) == r["sha256"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) < len(rows)
    for name in pngs:  # images without a record (killed between the two writes) are complete too
        Image.open(out / name).load()
    # what a kill during a write would leave: a partial temp file, and an interrupted last record
    (out / ".line000059-seed0.png.k1ll3d00.png").write_bytes(b"\x89PNG\r\n")
    with open(out / "results.jsonl", "a") as f:
        f.write('{"line": 59, "output": "line00')
    stamps = {r["output"]: (out / r["output"]).stat().st_mtime_ns for r in done}

    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == len(done) and summary["images"] == len(rows) - len(done)
    for name, stamp in stamps.items():
        assert (out / name).stat().st_mtime_ns == stamp, f"{name} was made again"
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".batch.lock"]
    recs = results(out)
    assert len(recs) == len(rows) and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert sha(out / r["output"]) == sha(ref / r["output"])

    # a changed row is made again, the others are not; a damaged image too
    rows[5]["prompt"] = "a changed poster"
    write_jsonl(src, rows)
    (out / "line000009-seed0.png").write_bytes(b"garbage")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out) == 0
    changed = sorted(n for n, s in stamps.items() if (out / n).stat().st_mtime_ns != s)
    assert changed == ["line000006-seed0.png", "line000009-seed0.png"]
    recs = {r["output"]: r for r in results(out)}
    assert recs["line000006-seed0.png"]["request"]["prompt"] == "a changed poster"
    assert sha(out / "line000009-seed0.png") == sha(ref / "line000009-seed0.png")
    assert sha(out / "line000006-seed0.png") != sha(ref / "line000006-seed0.png")
    assert json.loads((out / "summary.json").read_text())["images"] == 2

    # --overwrite makes everything again (same bytes)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out, "--overwrite") == 0
    assert all((out / n).stat().st_mtime_ns != s for n, s in stamps.items())
    assert json.loads((out / "summary.json").read_text())["images"] == len(rows)
    assert sha(out / "line000009-seed0.png") == sha(ref / "line000009-seed0.png")


def test_another_build_backend_or_precision_remakes_the_rows(tmp_path, tiny_ckpt, tiny_fp32):
    """Re-running into the same --out with another build (of another precision: an INT4 build of the same
    checkpoint exports the same graphs before quantizing them), or another backend, makes every row again; the
    same build and backend again skips them all."""
    from zimage_deploy import build

    int4 = tmp_path / "int4"
    shutil.copytree(tiny_fp32, int4)  # its graphs are up to date for the INT4 build: only quantized
    assert build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--precision", "int4", "--int4-method", "rtn",
                       "--skip-parity", "--no-quality-gate", "--out", str(int4)]) == 0
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "steps": 2, **SIZE} for p in PROMPTS[:2]])
    out = tmp_path / "out"

    def run(build_dir, *extra) -> dict:
        assert batch("--engine-dir", build_dir, "--input", src, "--out", out, *extra) == 0
        return json.loads((out / "summary.json").read_text())

    assert run(tiny_fp32)["images"] == 2
    fp32 = {r["output"]: sha(out / r["output"]) for r in results(out)}
    assert run(tiny_fp32)["skipped"] == 2
    made = run(int4)
    assert (made["images"], made["skipped"]) == (2, 0)
    assert all(sha(out / name) != digest for name, digest in fp32.items())  # the INT4 build's images now
    assert run(int4)["skipped"] == 2
    made = run(int4, "--backend", "torch")
    assert (made["images"], made["skipped"]) == (2, 0)
    assert run(int4, "--backend", "torch")["skipped"] == 2
    made = run(tiny_fp32)
    assert (made["images"], made["skipped"]) == (2, 0)
    assert {r["output"]: sha(out / r["output"]) for r in results(out)} == fp32


def test_rows_named_by_id_survive_reordering(tmp_path, tiny_fp32):
    rows = [{"id": "red-fox", "prompt": "a red fox", "steps": 2, **SIZE},
            {"id": "Cat_2", "prompt": "a cat", "steps": 2, **SIZE}]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out) == 0
    write_jsonl(src, [{"prompt": "a new first line", "steps": 2, **SIZE}] + rows[::-1])
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 1 and summary["skipped"] == 2
    assert [(r["line"], r["output"]) for r in results(out)] == [
        (1, "line000001-seed0.png"), (2, "Cat_2-seed0.png"), (3, "red-fox-seed0.png")]
    # ids that differ only in case would clash on some file systems
    write_jsonl(src, rows + [{"id": "cat_2", "prompt": "another cat", "steps": 2, **SIZE}])
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out) == 1
    assert "already made by line 2" in results(out)[-1]["error"]


def test_stale_temp_files_only_ours_are_removed(tmp_path):
    from zimage_deploy.batch.results import remove_stale_temps

    names = ["line000001-seed0.png", "results.jsonl"]
    mine = [".line000001-seed0.png.ab12cd34.png", ".results.jsonl.x9y8z7w6.jsonl"]
    others = [".line000002-seed0.png.ab12cd34.png", ".batch.lock", "line000001-seed0.png", ".hidden"]
    for n in mine + others:
        (tmp_path / n).write_text("x")
    assert remove_stale_temps(tmp_path, set(names)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


# -- image rows ---------------------------------------------------------------------------------------------
def test_img2img_and_inpaint_rows(tmp_path, tiny_fp32, runtime):
    src = tmp_path / "in"
    (src / "imgs").mkdir(parents=True)
    image = synthetic_image(72, 64, seed=3)  # 72 px: rounded down to 64 as generate does
    image.save(src / "imgs" / "photo.png")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(src / "imgs" / "mask.png")
    write_jsonl(src / "in.jsonl", [
        {"id": "i2i", "prompt": "a fox", "image": "imgs/photo.png", "strength": 0.7, "steps": 4, "seed": 2},
        {"id": "inpaint", "prompt": "a fox", "images": ["imgs/photo.png"], "mask": "imgs/mask.png", "steps": 4,
         "seed": 5},
        {"id": "t2i", "prompt": "a fox", "steps": 2, "seed": 1, **SIZE},
    ])
    out = tmp_path / "out"
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.jsonl", "--out", out, "--seeds", 2) == 0
    recs = {r["output"]: r for r in results(out)}
    assert recs["inpaint-seed6.png"]["request"]["strength"] == 0.6 and recs["i2i-seed3.png"]["width"] == 64
    for name, seed, kw in (("i2i-seed3.png", 3, dict(strength=0.7)), ("inpaint-seed5.png", 5, dict(mask=mask)),
                           ("inpaint-seed6.png", 6, dict(mask=mask))):
        ref = runtime.generate("a fox", seed=seed, steps=4, images=[image], **kw).images[0]
        assert np.array_equal(pixels(out / name), pixels(ref)), name
    # an input image changed since the last run: its rows are made again
    synthetic_image(72, 64, seed=4).save(src / "imgs" / "photo.png")
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.jsonl", "--out", out, "--seeds", 2) == 0
    assert json.loads((out / "summary.json").read_text())["images"] == 4


def test_lora_rows(tmp_path, tiny_ckpt, tiny_fp32, runtime):
    """`loras` names files of --lora-dir (the server's rules): the images equal the runtime's with the same LoRAs,
    rows with other LoRAs are never batched together, hostile names fail alone, and a changed LoRA file makes
    its rows again."""
    import shutil

    from test_lora import ALL, make_peft_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(make_peft_lora(tiny_ckpt, tmp_path / "a", 1, ALL, r=4, lora_alpha=8), loras / "style.safetensors")
    shutil.copy(make_peft_lora(tiny_ckpt, tmp_path / "b", 2, ("to_q", "to_v"), r=2, lora_alpha=2),
                loras / "face.safetensors")
    (tmp_path / "secret.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
    src = tmp_path / "in"
    write_jsonl(src / "in.jsonl", [
        {"id": "styled", "prompt": "a fox", "seed": 3, "steps": 2, **SIZE, "loras": [{"name": "style", "scale": 0.8}]},
        {"id": "both", "prompt": "a fox", "seed": 3, "steps": 2, **SIZE, "loras": ["style:0.8", "face.safetensors:-1"]},
        {"id": "plain", "prompt": "a fox", "seed": 3, "steps": 2, **SIZE},
        {"id": "styled2", "prompt": "a cat", "seed": 4, "steps": 2, **SIZE, "loras": ["style:0.8"]},
        {"id": "escape", "prompt": "a fox", **SIZE, "loras": ["../secret"]},
        {"id": "unknown", "prompt": "a fox", **SIZE, "loras": ["nothere"]},
        {"id": "scale", "prompt": "a fox", **SIZE, "loras": [{"name": "style", "scale": 1e9}]},
        {"id": "many", "prompt": "a fox", **SIZE, "loras": ["style"] * 50},
        {"id": "shape", "prompt": "a fox", **SIZE, "loras": {"style": 1}},
    ])
    out = tmp_path / "out"
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.jsonl", "--out", out, "--lora-dir", loras) == 1
    recs = {r["id"]: r for r in results(out)}
    for rid, words in (("escape", "not a valid name"), ("unknown", "unknown LoRA"), ("scale", "scale"),
                       ("many", "at most 4"), ("shape", "list")):
        assert recs[rid]["status"] == "error" and words in recs[rid]["error"], (rid, recs[rid])
    style, face = loras / "style.safetensors", loras / "face.safetensors"
    for rid, prompt, seed, specs in (("styled", "a fox", 3, [(style, 0.8)]),
                                     ("both", "a fox", 3, [(style, 0.8), (face, -1.0)]),
                                     ("plain", "a fox", 3, None), ("styled2", "a cat", 4, [(style, 0.8)])):
        want = reference(runtime, prompt, seed, loras=specs)
        assert np.array_equal(pixels(out / recs[rid]["output"]), want), rid
    assert np.abs(pixels(out / recs["styled"]["output"]) - pixels(out / recs["plain"]["output"])).max() > 10
    assert recs["styled"]["request"]["loras"][0]["sha256"] == sha(style)
    assert recs["styled"]["batch_size"] == recs["styled2"]["batch_size"] == 2  # the same LoRA set: one call
    assert recs["both"]["batch_size"] == recs["plain"]["batch_size"] == 1
    # the same job from CSV ("name:scale|name"), without --lora-dir: the LoRA rows fail, the others are made
    with open(src / "in.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "prompt", "seed", "steps", "height", "width", "loras"],
                                 ["both", "a fox", 3, 2, 64, 64, "style:0.8|face:-1"],
                                 ["plain", "a fox", 3, 2, 64, 64, ""]])
    out2 = tmp_path / "out2"
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.csv", "--out", out2) == 1
    recs2 = {r["id"]: r for r in results(out2)}
    assert "--lora-dir" in recs2["both"]["error"] and recs2["plain"]["status"] == "ok"
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.csv", "--out", out2, "--lora-dir", loras) == 0
    assert (out2 / recs["both"]["output"]).read_bytes() == (out / recs["both"]["output"]).read_bytes()
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.csv", "--out", out2, "--lora-dir",
                 tmp_path / "missing") == 2
    # a LoRA file changed: the rows using it are made again, the others are kept
    shutil.copy(loras / "style.safetensors", loras / "face.safetensors")
    assert batch("--engine-dir", tiny_fp32, "--input", src / "in.csv", "--out", out2, "--lora-dir", loras) == 0
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["images"] == 1 and summary["skipped"] == 1


def test_controlnet_rows(tmp_path, tmp_path_factory, tiny_ckpt, tiny_fp32):
    """`control_image` (a file, like `image`) and `controlnet_scale` on a ControlNet build: the images equal the
    runtime's, the command line's size fills control rows (the control image is resized to it), and bad values
    fail alone."""
    from zimage_deploy import ZImageRuntime, build
    from zimage_deploy.tiny_controlnet import write_controlnet

    cn = write_controlnet(tmp_path / "cn" / "union.safetensors", single_file=True, control_layers_places=(0, 1),
                          control_in_dim=16, add_control_noise_refiner=None, seed=4)
    engine = tmp_path_factory.mktemp("batch-cn")
    assert build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--precision", "fp32", "--out", str(engine),
                       "--controlnet", str(cn)]) == 0
    src = tmp_path / "in"
    src.mkdir()
    control = synthetic_image(96, 80, seed=6)
    control.save(src / "edges.png")
    Image.new("RGB", (8, 8)).save(src / "tiny.png")
    write_jsonl(src / "in.jsonl", [
        {"id": "cn", "prompt": "a fox", "seed": 1, "steps": 2, "control_image": "edges.png", "controlnet_scale": 0.5},
        {"id": "cnd", "prompt": "a fox", "seed": 2, "steps": 2, "control_image": "edges.png"},  # default scale
        {"id": "scaleonly", "prompt": "a fox", "controlnet_scale": 0.5},
        {"id": "big", "prompt": "a fox", "control_image": "edges.png", "controlnet_scale": 1e9},
        {"id": "small", "prompt": "a fox", "control_image": "tiny.png"},
        {"id": "missing", "prompt": "a fox", "control_image": "nothere.png"},
        {"id": "outside", "prompt": "a fox", "control_image": "../../etc/passwd"},
    ])
    out = tmp_path / "out"
    assert batch("--engine-dir", engine, "--input", src / "in.jsonl", "--out", out, "--height", 64, "--width",
                 96) == 1
    recs = {r["id"]: r for r in results(out)}
    for rid, words in (("scaleonly", "needs a control image"), ("big", "controlnet_scale"), ("small", "16"),
                       ("missing", "no such file"), ("outside", "outside")):
        assert recs[rid]["status"] == "error" and words in recs[rid]["error"], (rid, recs[rid])
    rt = ZImageRuntime(engine)
    for rid, seed, scale in (("cn", 1, 0.5), ("cnd", 2, None)):
        kw = {} if scale is None else {"controlnet_scale": scale}
        want = rt.generate("a fox", seed=seed, steps=2, height=64, width=96, control_image=control, **kw).images[0]
        got = out / recs[rid]["output"]
        assert Image.open(got).size == (96, 64) and np.array_equal(pixels(got), pixels(want)), rid
    assert recs["cnd"]["request"]["controlnet_scale"] == 0.75
    plain = rt.generate("a fox", seed=1, steps=2, height=64, width=96).images[0]
    assert np.abs(pixels(out / recs["cn"]["output"]) - pixels(plain)).max() > 10  # the control image matters
    # the plain tiny build takes no control image: the row fails with the validator's message
    out2 = tmp_path / "out2"
    write_jsonl(src / "one.jsonl", [{"prompt": "a fox", "control_image": "edges.png"}])
    assert batch("--engine-dir", tiny_fp32, "--input", src / "one.jsonl", "--out", out2) == 1
    assert "no ControlNet" in results(out2)[0]["error"]


def test_edit_rows(tmp_path, edit_fp32):
    from zimage_deploy import ZImageRuntime

    (tmp_path / "imgs").mkdir()
    a, b = synthetic_image(64, 64, seed=1), synthetic_image(80, 64, seed=2)
    a.save(tmp_path / "imgs" / "a.png")
    b.save(tmp_path / "imgs" / "b.png")
    with open(tmp_path / "edit.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "images", "guidance_scale", "steps", "seed"])
        w.writerow(["one", "make it blue", "imgs/a.png", "2", "2", "5"])
        w.writerow(["two", "put them together", "imgs/a.png | imgs/b.png", "0", "2", "7"])
        w.writerow(["none", "nothing to edit", "", "0", "2", "1"])
    out = tmp_path / "out"
    assert batch("--engine-dir", edit_fp32, "--input", tmp_path / "edit.csv", "--out", out) == 1
    recs = {r["id"]: r for r in results(out)}
    assert recs["none"]["status"] == "error" and "condition image" in recs["none"]["error"]
    rt = ZImageRuntime(edit_fp32)
    ref = rt.generate("make it blue", seed=5, steps=2, guidance_scale=2.0, images=[a]).images[0]
    assert np.array_equal(pixels(out / "one-seed5.png"), pixels(ref))
    ref = rt.generate("put them together", seed=7, steps=2, guidance_scale=0.0, images=[a, b]).images[0]
    assert np.array_equal(pixels(out / "two-seed7.png"), pixels(ref))
    assert recs["two"]["request"]["images"] == ["imgs/a.png", "imgs/b.png"] and recs["two"]["width"] == 80
    # a mask and a strength edit the first image in place (runtime/edit.py), as the runtime API does
    write_jsonl(tmp_path / "m.jsonl", [{"id": "m", "prompt": "x", "images": ["imgs/a.png", "imgs/b.png"],
                                        "mask": "imgs/a.png", "steps": 2, "seed": 1},
                                       {"id": "s", "prompt": "x", "images": ["imgs/a.png"], "strength": 0.5,
                                        "steps": 2, "seed": 2},
                                       {"prompt": "x", "images": ["imgs/a.png"], "mask": "imgs/b.png"}])
    assert batch("--engine-dir", edit_fp32, "--input", tmp_path / "m.jsonl", "--out", tmp_path / "m") == 1
    recs = results(tmp_path / "m")
    assert [r["status"] for r in recs] == ["ok", "ok", "error"] and "same size" in recs[2]["error"]
    ref = rt.generate("x", seed=1, steps=2, images=[a, b], mask=a).images[0]
    assert np.array_equal(pixels(tmp_path / "m" / "m-seed1.png"), pixels(ref)) and ref.size == a.size
    ref = rt.generate("x", seed=2, steps=2, images=[a], strength=0.5).images[0]
    assert np.array_equal(pixels(tmp_path / "m" / "s-seed2.png"), pixels(ref))


# -- Ray Data -----------------------------------------------------------------------------------------------
def test_ray_two_cpu_actors_same_files_and_resumable(tmp_path, tiny_fp32):
    import ray  # the `ray` extra

    rows = [{"prompt": p, "seed": i, "steps": 2, **SIZE} for i, p in enumerate(PROMPTS)]
    rows.append({**SIZE, "prompt": "bad", "height": 100})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    local = tmp_path / "local"
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", local, "--seeds", 2, "--batch-size", 2) == 1
    out = tmp_path / "ray"
    # half of the job done locally first: the Ray run must skip it
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out, "--seeds", 1, "--batch-size", 2) == 1
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out, "--seeds", 2, "--batch-size", 1,
                     "--ray", "--actors", 2) == 1
        summary = json.loads((out / "summary.json").read_text())
        before = (out / "results.jsonl").read_text()
        assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out, "--seeds", 2, "--overwrite",
                     "--ray", "--actors", 4) == 2  # more actors than the cluster's 3 CPUs: refused, nothing lost
        assert (out / "results.jsonl").read_text() == before
    finally:
        ray.shutdown()
    assert summary["skipped"] == len(PROMPTS) and summary["images"] == len(PROMPTS)
    ray_recs, local_recs = results(out), results(local)
    assert [(r["line"], r.get("output"), r.get("fingerprint"), r.get("sha256"), r["status"]) for r in ray_recs] == \
        [(r["line"], r.get("output"), r.get("fingerprint"), r.get("sha256"), r["status"]) for r in local_recs]
    for r in local_recs:
        if r["status"] == "ok":
            assert (out / r["output"]).read_bytes() == (local / r["output"]).read_bytes()
    workers = {r["worker"] for r in ray_recs if r["status"] == "ok"}
    assert len(workers) == 3, workers  # this process (the first half) and the two actors
    # and again: nothing to do, no Ray needed
    assert batch("--engine-dir", tiny_fp32, "--input", src, "--out", out, "--seeds", 2, "--ray", "--actors", 2) == 1
    assert json.loads((out / "summary.json").read_text())["images"] == 0


def test_request_fields_are_the_servers():
    need("python_multipart")  # the serve extra
    from zimage_deploy.batch.requests import REQUEST_FIELDS
    from zimage_deploy.serve import schema

    fields = getattr(schema, "GENERATE_FIELDS", None) or schema.GenerateRequest.model_fields  # (older schema)
    assert set(REQUEST_FIELDS) == set(fields)
