"""`--build-dir DIR` in every command that reads a build, and `--engine-dir DIR` (its older name) doing the same."""

import pytest

from zimage_deploy import bench, generate, plan, refit
from zimage_deploy.batch import job as batch
from zimage_deploy.cli import run_cli
from zimage_deploy.serve import __main__ as serve

COMMANDS = {
    "generate": (generate.main, ["--prompt", "a cat", "--output", "{tmp}/x.png"]),
    "batch": (batch.main, ["--input", "{tmp}/in.jsonl", "--out", "{tmp}/o"]),
    "bench": (bench.main, ["--report", "{tmp}/r"]),
    "plan": (plan.main, ["--target", "rtx4090", "--precision", "bf16"]),
    "refit": (refit.main, []),
    "serve": (serve.main, []),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_both_flags_name_the_build(command, tmp_path, capsys):
    main, rest = COMMANDS[command]
    rest = [a.format(tmp=tmp_path) for a in rest]
    errors = []
    for flag in ("--build-dir", "--engine-dir"):
        assert run_cli(lambda: main([flag, str(tmp_path / "nowhere"), *rest])) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and "nowhere has no manifest.json" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if c != "plan"))
def test_the_build_is_required(command, tmp_path, capsys):
    main, rest = COMMANDS[command]
    with pytest.raises(SystemExit):
        main([a.format(tmp=tmp_path) for a in rest])
    assert "--build-dir" in capsys.readouterr().err
