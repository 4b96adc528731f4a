"""Gemma 3 vision: the SigLIP tower counted on meta, logits against transformers' tiny random
Gemma3ForConditionalGeneration (one image, two images, Pan & Scan crops), cached and batched decoding
with images, the bidirectional image mask against literal matrices, and the refusals."""

import json
import types

import pytest
import torch

from gemmakit import vision, weights
from gemmakit.cache import make_cache
from gemmakit.config import from_hf, get_config
from gemmakit.image import PanScan, preprocess
from gemmakit.model import attention_mask, build, image_last_positions

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

BOI, EOI = vision.BOI_ID, vision.EOI_ID
IMG = 262144
SIZE = 32  # tiny tower: 32x32 pixels, 4x4 patches -> an 8x8 grid, pooled 2x2 -> 16 soft tokens per image
N_SOFT = 16
WINDOW = 6  # shorter than one image's soft tokens, so the window cuts into bidirectional image attention


def tiny_hf_config():
    return transformers.Gemma3Config(
        text_config=dict(vocab_size=262208, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                         max_position_embeddings=512, query_pre_attn_scalar=16),
        vision_config=dict(image_size=SIZE, patch_size=4, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=40, vision_use_head=False),
        mm_tokens_per_image=N_SOFT)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, gemmakit model loaded from its save_pretrained directory, that directory)."""
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(tiny_hf_config()).eval()
    with torch.no_grad():  # move every weight off its init value (norms start at 0, biases at 0, ...)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("tiny_gemma3_vision")
    hf.save_pretrained(path)
    return hf, load_dir(path), path


def load_dir(path):
    return weights.load(path, dtype=torch.float32)


def hf_logits(hf, ids, pixels):
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMG).long()).logits


def ours(model, ids, pixels, **kw):
    with torch.no_grad():
        embeds, image_mask = vision.embed_with_images(model, ids, pixels)
        return model(embeds=embeds, image_mask=image_mask, **kw)


def image_ids(num_crops=0):
    """Token ids of one image's text at the id level (what tokenizing image_text + expand gives)."""
    view = [108, BOI] + [IMG] * N_SOFT + [EOI, 108]
    if not num_crops:
        return view
    return [8291, 603] + view + [578, 1517] + sum(([236743] + view for _ in range(num_crops)), [])[1:]


def pixels(n, seed):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# -- the real sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma3-4b", "gemma3-12b", "gemma3-27b"])
def test_real_vision_tower_counted_on_meta(name):
    config = get_config(name)
    model = build(config)  # meta: shapes only
    tower = sum(p.numel() for p in model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    assert tower == 416_866_032  # the report's "417M"
    assert tower == config.param_counts()["vision"]
    assert projector == config.param_counts()["projector"] == 1152 + 1152 * config.d_model
    assert model.multi_modal_projector.kernel == 4  # 64x64 patches -> 16x16 = 256 tokens
    assert model.vision_tower.vision_model.encoder.layers[0].mlp.fc1.out_features == 4304
    patches = model.vision_tower(torch.empty(2, 3, 896, 896, device="meta"))  # shapes only, no compute
    assert patches.shape == (2, 4096, 1152)
    assert model.multi_modal_projector(patches).shape == (2, 256, config.d_model)


def test_text_only_model_refuses_images():
    model = build(get_config("gemma3-1b"))
    assert not hasattr(model, "vision_tower")
    with pytest.raises(ValueError, match="has no vision tower"):
        vision.encode_images(model, torch.zeros(1, 3, 896, 896))


@pytest.mark.parametrize("change, words", [({"hidden_act": "relu"}, "vision activation"),
                                           ({"vision_use_head": True}, "no pooling head")])
def test_config_refuses_other_towers(change, words):
    hf = tiny_hf_config().to_dict()
    hf["vision_config"].update(change)
    with pytest.raises(ValueError, match=words):
        from_hf(hf)


def test_init_weights_and_bf16(pair):
    _, model, _ = pair
    fresh = build(model.config, "cpu")
    fresh.init_weights(generator=torch.Generator().manual_seed(0))
    ln = fresh.vision_tower.vision_model.post_layernorm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert torch.equal(fresh.multi_modal_projector.mm_soft_emb_norm.weight, torch.zeros(24))  # (1 + w) form
    # bf16 end to end (tower, projector, decoder) stays close to fp32.
    ids = torch.tensor([[2, 30] + image_ids() + [31, 32]])
    px = pixels(1, 12)
    half = build(model.config, "cpu", torch.bfloat16)
    half.load_state_dict(model.state_dict())
    assert half.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    want, got = ours(model, ids, px), ours(half, ids, px).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


# -- parity with transformers ----------------------------------------------------------------------

def test_config_read_from_hf_dir(pair):
    _, model, path = pair
    c = model.config
    assert c.vision.image_size == SIZE and c.vision.tokens_per_image == N_SOFT and c.image_token_id == IMG
    assert c.vocab_size == 262208 and c == from_hf(json.loads((path / "config.json").read_text()), c.name)


def _relabel(key, form):
    """One HF Gemma3ForConditionalGeneration key in each of the layouts found in the wild."""
    for prefix in ("language_model.model.", "vision_tower.", "multi_modal_projector."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            break
    if form == "google":  # as Google published the 4B/12B/27B checkpoints
        return {"language_model.model.": "language_model.model.", "vision_tower.": "vision_tower.vision_model.",
                "multi_modal_projector.": "multi_modal_projector."}[prefix] + rest
    return {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector."}[prefix] + rest  # transformers 5 in memory


@pytest.mark.parametrize("form", ["google", "transformers5"])
def test_other_key_layouts_load_strictly(pair, form, tmp_path):
    from safetensors.torch import load_file, save_file
    _, model, path = pair
    state = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    renamed = {_relabel(k, form): v for k, v in state.items()}
    renamed["lm_head.weight" if form != "google" else "language_model.lm_head.weight"] = \
        state["language_model.model.embed_tokens.weight"].clone()  # a stored copy of the tied head is accepted
    save_file(renamed, tmp_path / "model.safetensors")
    again = load_dir(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    del renamed[next(k for k in renamed if "multi_modal_projector" in k)]
    save_file(renamed, tmp_path / "model.safetensors")
    with pytest.raises(weights.CheckpointError, match="missing multi_modal_projector"):
        load_dir(tmp_path)


def test_save_loads_in_transformers(pair, tmp_path):
    hf, model, _ = pair
    weights.save(model, tmp_path / "out")
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[2, 40] + image_ids() + [41, 42]])
    px = pixels(1, 7)
    torch.testing.assert_close(hf_logits(back, ids, px), hf_logits(hf, ids, px), rtol=0, atol=0)
    reloaded = load_dir(tmp_path / "out")
    torch.testing.assert_close(ours(reloaded, ids, px), ours(model, ids, px), rtol=0, atol=0)


def test_logits_one_image(pair):
    hf, model, _ = pair
    ids = torch.tensor([[2, 105, 2364, 107] + image_ids() + [9, 10, 11, 12, 13, 106, 107]])
    px = pixels(1, 1)
    want = hf_logits(hf, ids, px)
    torch.testing.assert_close(ours(model, ids, px), want, rtol=0, atol=1e-5)
    # The mask matters: the same prompt with a causal-only mask is measurably different.
    with torch.no_grad():
        causal = model(embeds=vision.embed_with_images(model, ids, px)[0])
    assert (causal - want).abs().max() > 1e-3


def test_logits_two_images(pair):
    hf, model, _ = pair
    ids = torch.tensor([[2, 50, 51] + image_ids() + [52, 53] + image_ids() + [54, 55, 56]])
    px = pixels(2, 2)
    torch.testing.assert_close(ours(model, ids, px), hf_logits(hf, ids, px), rtol=0, atol=1e-5)


def test_logits_pan_and_scan(pair, tmp_path):
    hf, model, _ = pair
    g = torch.Generator().manual_seed(3)
    Image.fromarray(torch.randint(0, 256, (300, 1000, 3), generator=g, dtype=torch.uint8).numpy()).save(
        tmp_path / "wide.png")
    proc = transformers.models.gemma3.image_processing_pil_gemma3.Gemma3ImageProcessorPil(
        size={"height": SIZE, "width": SIZE}, do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    ref = proc(images=[Image.open(tmp_path / "wide.png")], return_tensors="pt")
    px = preprocess(tmp_path / "wide.png", SIZE, PanScan())
    n_crops = px.shape[0] - 1
    assert n_crops == int(ref["num_crops"][0]) == 3
    torch.testing.assert_close(px, ref["pixel_values"], rtol=0, atol=1e-5)
    ids = torch.tensor([[2, 70] + image_ids(n_crops) + [71, 72]])
    torch.testing.assert_close(ours(model, ids, px), hf_logits(hf, ids, ref["pixel_values"]), rtol=0, atol=1e-5)


def test_cached_decode_after_image_prompt_equals_full_forward(pair):
    hf, model, _ = pair
    prompt = [2, 60] + image_ids() + [61, 62]
    tail = [63, 64, 65, 66, 67, 68, 69, 70]  # decoded one at a time, past the window
    ids = torch.tensor([prompt + tail])
    px = pixels(1, 4)
    full = ours(model, ids, px)
    torch.testing.assert_close(full, hf_logits(hf, ids, px), rtol=0, atol=1e-5)
    cache = make_cache(model.config, 1, ids.shape[1])
    assert any(c.ring for c in cache)  # local layers really wrap
    steps = [ours(model, ids[:, :len(prompt)], px, cache=cache)]
    with torch.no_grad():
        for t in range(len(prompt), ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_batched_left_padded_prompts_with_images(pair):
    _, model, _ = pair
    a = [2, 80] + image_ids() + [81, 82] + image_ids() + [83]
    b = [2, 90, 91, 92] + image_ids() + [93]
    px_a, px_b = pixels(2, 5), pixels(1, 6)
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    pos = torch.tensor([list(range(len(a))), [-1] * pad + list(range(len(b)))])
    batched = ours(model, ids, torch.cat([px_a, px_b]), positions=pos)
    torch.testing.assert_close(batched[0], ours(model, torch.tensor([a]), px_a)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[1, pad:], ours(model, torch.tensor([b]), px_b)[0], rtol=0, atol=1e-5)


def test_split_image_refused_with_cache(pair):
    _, model, _ = pair
    ids = torch.tensor([[2, 60] + image_ids()])
    cache = make_cache(model.config, 1, 64)
    embeds, mask = vision.embed_with_images(model, ids, pixels(1, 0))
    with pytest.raises(ValueError, match="one forward pass"):
        model(embeds=embeds[:, :8], image_mask=mask[:, :8], cache=cache)


def test_image_count_must_match_placeholders(pair):
    _, model, _ = pair
    ids = torch.tensor([[2] + image_ids() + [5]])
    with pytest.raises(ValueError, match="soft tokens"):
        vision.embed_with_images(model, ids, pixels(2, 0))
    with pytest.raises(ValueError, match="no image was given"):
        vision.embed_with_images(model, ids, None)


# -- the mask, written out ---------------------------------------------------------------------------

def test_image_mask_literal():
    # text text boi img img img eoi text: the three image tokens see each other; the rest is causal.
    image = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    pos = torch.arange(8)[None]
    last = image_last_positions(image, pos)
    assert last.tolist() == [[0, 1, 2, 5, 5, 5, 6, 7]]
    full = attention_mask(pos, pos, None, q_last=last)[0, 0].int().tolist()
    assert full == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    # Window 2 (a local layer): each query keeps only keys q - 2 < k, while image tokens still see ahead.
    local = attention_mask(pos, pos, 2, q_last=last)[0, 0].int().tolist()
    assert local == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_two_adjacent_images_stay_separate():
    # Two runs of image tokens are two images: the first does not see into the second.
    image = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    pos = torch.arange(5)[None]
    mask = attention_mask(pos, pos, None, q_last=image_last_positions(image, pos))[0, 0].int().tolist()
    assert mask == [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ]


# -- prompt text --------------------------------------------------------------------------------------

def test_image_text_matches_reference_processor():
    full = "\n\n<start_of_image>" + "<image_soft_token>" * N_SOFT + "<end_of_image>\n\n"
    proc = types.SimpleNamespace(full_image_sequence=full)
    replace = transformers.models.gemma3.processing_gemma3.Gemma3Processor.replace_image_token
    for n in (0, 2, 4):
        want = replace(proc, {"num_crops": [n]}, 0)
        got = vision.image_text(n).replace("<start_of_image>", "<start_of_image>" + "<image_soft_token>" * N_SOFT)
        assert got == want
    assert vision.image_text(2).startswith("Here is the original image \n\n<start_of_image>")


def test_insert_images_and_expand():
    assert vision.insert_images("Describe this image.", [0]) == vision.IMAGE_TEXT + "Describe this image."
    text = vision.insert_images("A <start_of_image> and B <start_of_image>?", [0, 2])
    assert text == "A " + vision.image_text(0) + " and B " + vision.image_text(2) + "?"
    with pytest.raises(ValueError, match="markers"):
        vision.insert_images("one <start_of_image>", [0, 0])
    assert vision.expand_image_tokens([2, 108, BOI, EOI, 108], 3, IMG) == [2, 108, BOI, IMG, IMG, IMG, EOI, 108]


# -- the engine -----------------------------------------------------------------------------------------

def test_batched_generation_with_images_follows_reference(pair):
    from gemmakit.engine import generate
    hf, model, _ = pair
    prompts = [[2, 80] + image_ids() + [81, 82] + image_ids() + [83], [2, 90, 91, 92] + image_ids() + [93]]
    images = [pixels(2, 8), pixels(1, 9)]
    steps = list(generate(model, prompts, 6, images=torch.cat(images)))
    for row, (prompt, px) in enumerate(zip(prompts, images)):
        ids = list(prompt)
        for _ in range(6):  # greedy from the reference's full forward at every step
            ids.append(int(hf_logits(hf, torch.tensor([ids]), px)[0, -1].argmax()))
        assert [s[row] for s in steps] == ids[len(prompt):]


def test_engine_refuses_images_for_text_only_model():
    from gemmakit.engine import generate
    from conftest import random_model, tiny_config
    model = random_model(tiny_config(3))
    with pytest.raises(ValueError, match="has no vision tower"):
        next(generate(model, [[2, 5, 6]], 2, images=torch.zeros(1, 3, 896, 896)))


# -- the command line ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_dir(pair, tmp_path_factory):
    """The tiny vision checkpoint plus the real Gemma 3 tokenizer (from the embedded 270M GGUF)."""
    import shutil

    from gemmakit.gguf import read_gguf_header
    from gemmakit.hub import default_gguf
    from gemmakit.tokenizer import Tokenizer
    out = tmp_path_factory.mktemp("cli") / "model"
    shutil.copytree(pair[2], out)
    Tokenizer.from_gguf_vocab(read_gguf_header(default_gguf())[1]).save(out)
    return out


@pytest.fixture
def recorded(monkeypatch):
    """Every generate() call the CLI makes: (prompt ids, images)."""
    from gemmakit import engine
    calls, real = [], engine.generate

    def spy(model, prompts, max_new_tokens, **kw):
        calls.append((prompts[0], kw.get("images")))
        return real(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(engine, "generate", spy)
    return calls


def wide_png(tmp_path):
    g = torch.Generator().manual_seed(11)
    Image.fromarray(torch.randint(0, 256, (300, 1000, 3), generator=g, dtype=torch.uint8).numpy()).save(
        tmp_path / "wide.png")
    return tmp_path / "wide.png"


SOFT = [BOI] + [IMG] * N_SOFT + [EOI]
DESCRIBE = [82858, 672, 2471, 236761]  # "Describe this image." (ids from transformers' Gemma 3 tokenizer)


@pytest.mark.real
@pytest.mark.slow
def test_cli_generate_with_image(cli_dir, recorded, tmp_path, capsys):
    from gemmakit import cli
    png = wide_png(tmp_path)
    assert cli.main(["generate", "--model", str(cli_dir), "--image", str(png), "--max-new-tokens", "3",
                     "Describe this image."]) == 0
    (ids, images), = recorded
    # <bos> "\n\n" <start_of_image> soft... <end_of_image> "\n\n" text, as transformers' processor has it
    assert ids == [2, 108] + SOFT + [108] + DESCRIBE
    torch.testing.assert_close(images, preprocess(png, SIZE), rtol=0, atol=0)
    assert capsys.readouterr().out.startswith("Describe this image.")

    assert cli.main(["generate", "--model", str(cli_dir), "--image", str(png), "--pan-and-scan",
                     "--max-new-tokens", "2", "Describe this image."]) == 0
    ids, images = recorded[1]
    assert images.shape[0] == 4  # the original and 3 crops
    # "Here is the original image \n\n" <image> " and here are some crops to help you see better \n\n" ...
    here = [8291, 563, 506, 3303, 2471, 236743, 108]
    crops_text = [108, 532, 1590, 659, 1070, 20859, 531, 1601, 611, 1460, 2480, 236743, 108]
    assert ids == [2] + here + SOFT + crops_text + SOFT + [108, 236743, 108] + SOFT + [108, 236743, 108] + SOFT \
        + [108] + DESCRIBE


@pytest.mark.real
@pytest.mark.slow
def test_cli_chat_image_command(cli_dir, recorded, tmp_path, monkeypatch, capsys):
    import io

    from gemmakit import cli
    from gemmakit.tokenizer import Tokenizer
    png = wide_png(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {png}\nWhat is it?\n/image {tmp_path}/gone.png\n"
                                                 f"/image {png}\nAnd this?\n"))
    assert cli.main(["chat", "--model", str(cli_dir), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert f"image file not found: {tmp_path}/gone.png" in err  # reported, and the chat goes on
    question = Tokenizer.from_dir(cli_dir).encode("What is it?", add_bos=False)
    (first, images1), (second, images2) = recorded
    # The template puts the image at the start of the user turn.
    assert first == [2, 105, 2364, 109] + SOFT + [108] + question + [106, 107, 105, 4368, 107]
    assert images1.shape[0] == 1 and images2.shape[0] == 2  # the first turn's image stays in the prompt
    assert second[:len(first)] == first and second.count(BOI) == 2


def test_cli_image_errors(tmp_path, capsys):
    from gemmakit import cli
    (tmp_path / "text.png").write_text("not pixels")
    for path, words in [(tmp_path / "gone.png", "image file not found"), (tmp_path / "text.png", "not an image")]:
        assert cli.main(["generate", "--model", "gemma3-4b", "--image", str(path), "hi"]) == 1
        err = capsys.readouterr().err.strip()
        assert words in err and str(path) in err and "\n" not in err
    png = wide_png(tmp_path)
    assert cli.main(["generate", "--model", "gemma3-1b", "--image", str(png), "hi"]) == 1
    assert "gemma3-1b has no vision tower" in capsys.readouterr().err
    from conftest import random_model, tiny_config
    text_only = weights.save(random_model(tiny_config(3)), tmp_path / "text-only")  # a Gemma3ForCausalLM checkpoint
    assert cli.main(["generate", "--model", str(text_only), "--image", str(png), "hi"]) == 1
    assert "has no vision tower: it is a text-only model" in capsys.readouterr().err
