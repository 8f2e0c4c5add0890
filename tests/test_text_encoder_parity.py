"""The cut Qwen3 text encoder against transformers' hidden_states[-2], float32, through the prompt rules."""

import pytest
import torch
from transformers import AutoModel

from zimage_deploy.models.load import load_text_encoder
from zimage_deploy.runtime.prompt import PromptTokenizer

PROMPTS = [
    ["a cat"],
    ["一只在雨中奔跑的小狗，电影感，高细节", "a very long prompt about a lighthouse on a cliff at dusk " * 3],
]


@pytest.mark.parametrize("prompts", PROMPTS)
@pytest.mark.parametrize("which", ["tiny", "alt"])
def test_text_encoder_matches_transformers(which, prompts, tiny_ckpt, alt_ckpt):
    ckpt = tiny_ckpt if which == "tiny" else alt_ckpt
    ref = AutoModel.from_pretrained(ckpt / "text_encoder").eval()
    ours = load_text_encoder(ckpt)
    ids, mask = PromptTokenizer(ckpt / "tokenizer")(prompts)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
        got = ours(ids, mask)
    for i in range(len(prompts)):
        keep = mask[i].bool()
        torch.testing.assert_close(got[i][keep], expected[i][keep], rtol=1e-5, atol=1e-5)


def test_prompt_over_limit_is_truncated_with_warning(tiny_ckpt):
    tok = PromptTokenizer(tiny_ckpt / "tokenizer", max_length=16)
    with pytest.warns(UserWarning, match="truncated to 16"):
        ids, mask = tok(["word " * 50])
    assert ids.shape == (1, 16) and mask.all()
