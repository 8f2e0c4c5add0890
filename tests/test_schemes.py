"""The quantization schemes are objects looked up by name (schemes.py): one per quantized precision, and no module
branches on a scheme's name."""

import ast
from pathlib import Path

import pytest
import torch

from zimage_deploy.errors import UserError
from zimage_deploy.schemes import SCHEMES, get_scheme
from zimage_deploy.targets import QUANTIZED

PACKAGE = Path(__file__).resolve().parent.parent / "zimage_deploy"


def test_one_scheme_per_quantized_precision():
    assert sorted(SCHEMES) == sorted(QUANTIZED)
    assert all(get_scheme(n).name == n for n in QUANTIZED)


@pytest.mark.parametrize("name", ["", "FP8", "int8", "fp8 ", None, 4])
def test_unknown_scheme_is_a_user_error(name):
    with pytest.raises(UserError, match="unknown quantization scheme"):
        get_scheme(name)


def test_weight_ranges_blocks_and_calibration_needs():
    w = torch.arange(-32.0, 32.0).reshape(4, 16)
    assert get_scheme("fp8").weight_amax(w, 8).item() == 32.0
    int4 = get_scheme("int4").weight_amax(w, 8)
    assert int4.shape == (4, 2) and int4[0].tolist() == [32.0, 24.0] and int4[3].tolist() == [23.0, 31.0]
    assert [get_scheme(n).block(32) for n in ("fp8", "int4", "nvfp4")] == [None, 32, 16]
    assert [get_scheme(n).layer_width(32) for n in ("fp8", "int4", "nvfp4")] == [1, 32, 16]
    assert get_scheme("int4").needs_data("awq") and not get_scheme("int4").needs_data("rtn")
    assert get_scheme("fp8").needs_data("rtn") and get_scheme("nvfp4").needs_data("rtn")
    assert get_scheme("int4").describe(True) != get_scheme("int4").describe(False)


def _name_tests(tree) -> list[int]:
    """Lines comparing something with a scheme's name (`x == "fp8"`, `x in ("int4", ...)`)."""
    def names(node):
        if isinstance(node, ast.Constant):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts if isinstance(e, ast.Constant)}
        return set()

    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Compare)
            and any(names(x) & set(SCHEMES) for x in [n.left, *n.comparators])]


def test_the_name_test_finder_finds_name_tests():
    assert _name_tests(ast.parse('a = 1\nif s == "nvfp4" or t in ("bf16", "int4"):\n    pass')) == [2, 2]


def test_no_module_branches_on_a_scheme_name():
    found = {str(p.relative_to(PACKAGE)): _name_tests(ast.parse(p.read_text())) for p in PACKAGE.rglob("*.py")
             if p.name != "schemes.py"}
    assert {k: v for k, v in found.items() if v} == {}
