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


def test_traced_text_tower_equals_eager_at_every_length_and_batch_size():
    """The service's TorchScript text tower: one trace per token-length bucket, each used for any batch size, and
    equal to open_clip's own encode_text; a model that cannot be cut runs eagerly."""
    from psdclip.train.models import TracedText

    model, _, _, tokenizer = build_model("tiny")
    model.eval()
    traced = TracedText(model)
    assert traced.usable and traced.buckets == [8, 16, 32]  # tiny's context is 32 tokens
    texts = ["a red circle", "two large yellow circles on the left next to a blue star, white backdrop", "",
             "x " * 40, "x " * 90, "blue"]
    with torch.no_grad():
        for batch in ([texts[0]], ["two large yellow circles on the left"], texts[:3] * 7, texts[3:5], texts[5:]):
            tokens = tokenizer(batch)
            torch.testing.assert_close(traced(tokens), model.encode_text(tokens, normalize=True), atol=1e-5,
                                       rtol=1e-4)
    # each bucket was traced once, when first needed, and its trace is used (None would mean eager)
    assert sorted(traced.traces) == [8, 16, 32] and all(t is not None for t in traced.traces.values())
    warmed = TracedText(model)
    warmed.warm(tokenizer, "cpu")
    assert sorted(warmed.traces) == warmed.buckets and all(t is not None for t in warmed.traces.values())
    model.text_pool_type = "last"
    eager = TracedText(model)
    with torch.no_grad():
        tokens = tokenizer(texts)
        torch.testing.assert_close(eager(tokens), model.encode_text(tokens, normalize=True))
    assert not eager.usable and not eager.traces
