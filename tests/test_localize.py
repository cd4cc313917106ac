"""ZONE.md section 3: attention capture and the mask math, against independent implementations."""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from zone_engine.errors import EditWarning
from zone_engine.localize import (
    attention_grid,
    attention_probability_sum,
    binarize_reference,
    difference_map,
    localize,
    record_cross_attention,
    recorded_layers,
    threshold_difference,
)
from zone_engine.models import build_tiny_unet
from zone_engine.text import count_tokens, encode_instruction


class StoreEverything:
    """Brute force, like the reference's AttentionStore: keep every layer's full probabilities."""

    def __init__(self, name: str, store: dict):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (3*heads, N, 77), batch-major rows
        self.store.setdefault(self.name, []).append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def _unet_inputs(latent_size, seed):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(3, 8, *latent_size, generator=generator)
    context = torch.randn(3, 77, 32, generator=generator)
    return sample, context


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_tiny_unet().eval()


@pytest.mark.parametrize("latent_size", [(8, 8), (12, 8), (8, 16)])
def test_capture_does_not_change_unet_output(unet, latent_size):
    sample, context = _unet_inputs(latent_size, 0)
    with torch.inference_mode():
        plain = unet(sample, 500, encoder_hidden_states=context).sample
        grid = (latent_size[0] // 4, latent_size[1] // 4)
        with record_cross_attention(unet, latent_size, grid) as accumulator:
            recorded = unet(sample, 500, encoder_hidden_states=context).sample
    assert accumulator.rows > 0
    assert (plain - recorded).abs().max().item() <= 1e-5
    # The UNet's own processors come back afterwards.
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


@pytest.mark.parametrize("latent_size", [(8, 8), (12, 8)])
def test_capture_records_exactly_zone_layers_and_rows(unet, latent_size):
    grid = (latent_size[0] // 4, latent_size[1] // 4)
    steps = [_unet_inputs(latent_size, seed) for seed in (1, 2)]

    store: dict[str, list[torch.Tensor]] = {}
    names = [n for n in unet.attn_processors if "attn2" in n and "mid_block" not in n]
    originals = unet.attn_processors
    unet.set_attn_processor({n: (StoreEverything(n, store) if n in names else p) for n, p in originals.items()})
    with torch.inference_mode():
        for sample, context in steps:
            unet(sample, 900, encoder_hidden_states=context)
    unet.set_attn_processor(originals)

    # The reference's aggregation: every down/up cross-attention map with N == h*w queries,
    # rows P[heads:] (the two empty-prompt branches), averaged over steps, layers and rows.
    heads = 2
    matching = [n for n in names if store[n][0].shape[1] == grid[0] * grid[1]]
    assert len(matching) == 5  # SD1.5 topology: 2 down + 3 up layers
    per_layer = [torch.stack(store[n]).mean(0)[heads:] for n in matching]  # average over steps
    expected = torch.cat(per_layer).mean(0)

    with torch.inference_mode(), record_cross_attention(unet, latent_size, grid) as accumulator:
        for sample, context in steps:
            unet(sample, 900, encoder_hidden_states=context)
    assert {n.removesuffix(".processor") for n in matching} == set(recorded_layers(unet, latent_size, grid))
    assert accumulator.rows == 2 * 5 * 2 * heads  # steps x layers x kept batch rows x heads
    assert (accumulator.average() - expected).abs().max().item() <= 1e-6


def test_the_attention_grid_is_the_image_at_1_32():
    """ZONE.md: the layers read have ceil(H/32) x ceil(W/32) queries; latents are H/8 x W/8, so 512x512 gives
    16x16 and 512x768 gives 16x24 (the latent halved twice)."""
    assert attention_grid((64, 64)) == (16, 16)
    assert attention_grid((64, 96)) == (16, 24)


def test_attention_probability_sum_matches_softmax():
    rng = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 5, 4, generator=rng), torch.randn(2, 3, 7, 4, generator=rng)
    expected = torch.zeros(5, 7)
    for r in range(2):
        for h in range(3):
            expected += torch.softmax(query[r, h] @ key[r, h].T * 0.5, dim=-1)
    assert torch.allclose(attention_probability_sum(query, key, 0.5), expected, atol=1e-6)


def test_the_reference_computes_half_precision_inputs_in_fp32():
    """As kernel 1 does (it accumulates in fp32): fp16 scores and softmax would round the map it is checked by."""
    rng = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 3, 5, 8, generator=rng).half(), torch.randn(2, 3, 77, 8, generator=rng).half()
    got = attention_probability_sum(query, key, 0.35)
    assert got.dtype == torch.float32
    assert torch.equal(got, attention_probability_sum(query.float(), key.float(), 0.35))


# ------------------------------------------------------------------------------ mask math, independently


def _components_4(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        queue, region = deque([start]), []
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(region)
    return regions


def reference_mask(average: np.ndarray, grid, last_token, size, rule, min_area=64):
    """ZONE's reference mask code path, re-written from the reference: numpy float32, cv2, PIL on RGB."""
    maps = average.reshape(*grid, 77).astype(np.float32)
    images = []
    for token in (0, last_token):
        m = maps[:, :, token]
        m = np.float32(255) * m / m.max()
        images.append(np.repeat(m[:, :, None], 3, axis=2).astype(np.uint8))
    diff = cv2.subtract(images[0], images[1])
    diff = np.array(Image.fromarray(diff).resize((size[1], size[0])))
    if rule == "reference":
        scaled = cv2.convertScaleAbs(diff, alpha=2, beta=0)
        binary = cv2.bitwise_not(np.where(scaled <= 108, 0, 255).astype(np.uint8))[:, :, 0] > 0
    else:
        binary = diff[:, :, 0] < 128
    out = binary.copy()
    for region in _components_4(binary):
        if len(region) < min_area:
            for y, x in region:
                out[y, x] = False
    return out, diff[:, :, 0]


@pytest.mark.parametrize(
    "grid,size", [((2, 2), (64, 64)), ((3, 2), (96, 64)), ((4, 6), (128, 192)), ((5, 3), (160, 96))]
)
@pytest.mark.parametrize("rule", ["reference", "paper"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_math_matches_reference(grid, size, rule, seed):
    rng = np.random.default_rng(seed)
    # Smooth-ish maps so the threshold cuts through real regions, plus noise.
    average = rng.random((grid[0] * grid[1], 77)).astype(np.float32) ** 3
    last_token = int(rng.integers(2, 77))
    expected_mask, expected_diff = reference_mask(average, grid, last_token, size, rule)
    result = localize(torch.from_numpy(average), grid, last_token, size, rule=rule)
    assert np.array_equal(result.difference, expected_diff)
    assert np.array_equal(result.mask_b, expected_mask)


def test_an_island_of_the_edit_region_under_64_pixels_is_dropped_and_a_large_region_kept():
    """The random maps above never make a component under 64 px: here one grid cell (4x4 px at 64x64) is an
    island of M_b, beside a 6x6-cell block, and the small-region filter must take it out."""
    grid, size, last_token = (16, 16), (64, 64), 5
    first, last = np.ones(grid, np.float32), np.full(grid, 0.01, np.float32)  # d large: outside M_b
    last[2, 12] = 1.0  # d = 0 in one cell: an island
    last[8:14, 2:8] = 1.0  # and a block of 36 cells
    average = np.full((*grid, 77), 0.5, np.float32)
    average[..., 0], average[..., last_token] = first, last
    average = torch.from_numpy(average.reshape(-1, 77))
    before, _ = binarize_reference(average, grid, last_token, size)
    island, block = (slice(8, 12), slice(48, 52)), (slice(34, 54), slice(10, 30))
    assert before[island].any() and 0 < before[island].sum() < 64  # the island is there, and small
    mask_b = localize(average, grid, last_token, size).mask_b
    assert not mask_b[island].any() and mask_b[block].all()
    assert np.array_equal(mask_b, reference_mask(average.numpy(), grid, last_token, size, "reference")[0])


def test_the_thresholds_defaults_are_the_papers_and_the_references():
    """paper: d < T = 128; reference: min(2d, 255) <= 108, so d = 54 is in M_b and 55 is not."""
    assert threshold_difference(np.array([[127, 128]], np.uint8), "paper").tolist() == [[True, False]]
    assert threshold_difference(np.array([[54, 55, 200]], np.uint8), "reference").tolist() == [[True, False, False]]


def test_the_reference_rule_doubles_d_with_saturation_at_255():
    """The reference doubles d with cv2.convertScaleAbs, which saturates: 2 * 200 is 255, not 400, so at the
    highest threshold a config allows (255) every d is in M_b, and at 254 none from 128 up is."""
    d = np.array([[0, 127, 128, 200, 255]], np.uint8)
    assert threshold_difference(d, "reference", reference_threshold=255).tolist() == [[True] * 5]
    assert threshold_difference(d, "reference", reference_threshold=254).tolist() == [[True, True, False, False, False]]


def test_binarize_and_localize_default_to_the_reference_rule_on_a_hand_worked_map():
    """ZONE.md section 3 on a 1x5 map (the working size, so no resize): token 0 is flat, so a1 = 255 everywhere;
    token L-1 is scaled so that uint8(255 aL / max) truncates to 255, 201, 200, 128, 127, giving d = 0, 54, 55,
    127, 128. The default rule is the reference's (d <= 54), the paper's is d < 128; nothing else may shift it."""
    last_token = 4
    average = torch.full((5, 77), 0.5)
    average[:, 0] = 1.0
    average[:, last_token] = torch.tensor([255.0, 201.5, 200.5, 128.5, 127.5]) / 255
    mask, difference = binarize_reference(average, (1, 5), last_token, (1, 5))
    assert difference.tolist() == [[0, 54, 55, 127, 128]]
    assert mask.tolist() == [[True, True, False, False, False]]
    paper, _ = binarize_reference(average, (1, 5), last_token, (1, 5), rule="paper")
    assert paper.tolist() == [[True, True, True, True, False]]
    assert localize(average, (1, 5), last_token, (1, 5), min_area=0).mask_b.tolist() == mask.tolist()


def test_localize_drops_components_under_64_pixels_by_default():
    """ZONE.md: M_b's 4-connected components under 64 pixels are dropped: a 63 px one goes, a 64 px one stays
    (the binarization is stubbed so that the components' sizes are exact)."""
    mask = np.zeros((32, 32), bool)
    mask[1:8, 1:10] = True  # 7 x 9 = 63 px
    mask[16:24, 16:24] = True  # 8 x 8 = 64 px

    def binarize(average, grid, last_token, size, **_):
        return mask, np.zeros(size, np.uint8)

    mask_b = localize(torch.zeros(4, 77), (2, 2), 1, (32, 32), binarize=binarize).mask_b
    expected = np.zeros_like(mask)
    expected[16:24, 16:24] = True
    assert np.array_equal(mask_b, expected)


def test_l_counts_the_instructions_tokens_with_start_and_end_up_to_77(tiny_models):
    """L - 1 is the token whose map is subtracted: the end token, one past the instruction's last word."""
    tokenizer, encoder = tiny_models.tokenizer, tiny_models.text_encoder
    encoded = encode_instruction(tokenizer, encoder, "make the dog")  # <start> make the dog <end>
    assert (encoded.token_count, encoded.truncated) == (5, False)
    assert encode_instruction(tokenizer, encoder, "dog " * 75).token_count == 77  # 75 words: exactly full
    with pytest.warns(EditWarning):
        assert encode_instruction(tokenizer, encoder, "dog " * 76).token_count == 77  # one over: truncated


def test_an_instruction_is_tokenized_as_the_references_clip_tokenizer_read_it(tiny_models):
    """Its transformers 4.27 fixed the text with ftfy first: a curly apostrophe (typed on phones), a ligature and
    full-width letters read as their plain forms, for L and the prompt alike; transformers 5 read them as they are."""
    tokenizer, encoder = tiny_models.tokenizer, tiny_models.text_encoder
    plain = encode_instruction(tokenizer, encoder, "make the cat's fish blue")
    typed = encode_instruction(tokenizer, encoder, "make the cat\u2019s \ufb01sh \uff42\uff4c\uff55\uff45")
    assert typed.token_count == plain.token_count and torch.equal(typed.context, plain.context)
    assert count_tokens(tokenizer, "the cat\u2019s") == count_tokens(tokenizer, "the cat's")


def test_difference_is_saturating_and_uses_token_l_minus_1():
    average = torch.zeros(4, 77)
    average[:, 0] = torch.tensor([1.0, 0.5, 0.25, 0.1])
    average[:, 5] = torch.tensor([0.1, 0.5, 1.0, 0.1])  # L - 1 = 5
    average[:, 6] = 1.0  # a later token must be ignored
    d = difference_map(average, (2, 2), last_token=5)
    a1 = (255 * average[:, 0] / average[:, 0].max()).to(torch.uint8).int()
    a_l = (255 * average[:, 5] / average[:, 5].max()).to(torch.uint8).int()
    assert d.reshape(-1).tolist() == torch.clamp(a1 - a_l, min=0).tolist()
    assert d.reshape(-1)[2] == 0  # negative difference saturates at 0, not 256 - x


def test_truncating_cast_not_rounding():
    from zone_engine.localize import token_map_uint8

    # 255 * 0.999 = 254.745 -> 254 when truncated (rounding would give 255).
    assert token_map_uint8(torch.tensor([1.0, 0.999])).tolist() == [255, 254]
