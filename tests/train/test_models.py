"""Text encoding on trimmed tokens gives what open_clip's encode_text gives on the full 77."""
import torch

from psdclip.train.models import build_model, encode_text


def test_trimmed_text_encoding_equals_open_clips():
    model, _, _, tokenizer = build_model("tiny")
    model.eval()
    texts = ["a red circle", "two large yellow circles on the left next to a blue star, white backdrop", "", "x " * 90]
    tokens = tokenizer(texts)
    with torch.no_grad():
        full, trimmed = model.encode_text(tokens, normalize=True), encode_text(model, tokens)
        short = encode_text(model, tokenizer(texts[:1]))
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(short, full[:1], atol=1e-5, rtol=1e-4)  # a batch of one short caption: few tokens
    model.text_pool_type = "last"  # pooled at the last position: padding matters, so no trimming
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens, normalize=True))
