"""The subtle parts of causvid.py, proven on CPU in fp32: the mask, causality, the KV cache,
parity with diffusers' Wan, flow matching and the DMD gradient."""

import math
from dataclasses import replace

import pytest
import torch

import causvid as cv
import toy_world as toy
import training
import utils
import wan


def small_config(**kw) -> cv.Config:
    """A DiT small enough for exhaustive tests: 6 frames of 8x8 with 4 tokens per frame."""
    base = dict(
        channels=3,
        height=8,
        width=8,
        num_frames=6,
        chunk_size=2,
        patch_size=(1, 4, 4),
        dim=48,
        ffn_dim=96,
        num_heads=2,
        num_layers=2,
        freq_dim=32,
        text_dim=16,
        text_len=5,
    )
    return cv.Config(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """A fresh DiT is adaLN-Zero (it outputs exactly 0), which would make every comparison vacuous:
    give every parameter random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make_model(causal: bool, cfg=None, seed=0) -> cv.DiT:
    return randomize(cv.DiT(cfg or small_config(), causal=causal), seed)


def x0_to_velocity(x_t, x0, t):
    """The inverse of cv.velocity_to_x0 (undefined at t = 0): a model that predicts exactly x0."""
    return (x_t - x0) / cv._s(t, x_t)


def inputs(cfg, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.num_frames, cfg.channels, cfg.height, cfg.width, generator=g)
    t = torch.rand(B, cfg.num_frames, generator=g) * 1000
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, text


# ---------------------------------------------------------------------------------------------
# 1. The mask is Eq. 5
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames,k", [(1, 1), (6, 1), (6, 2), (7, 3), (12, 3), (21, 3), (10, 5), (4, 4)]
)
def test_mask_is_eq5(frames, k):
    mask = cv.block_causal_mask(frames, k)
    for i in range(frames):
        for j in range(frames):
            assert bool(mask[i, j]) == (math.floor(j / k) <= math.floor(i / k)), (i, j)


def test_mask_expands_to_tokens():
    frame_mask = cv.block_causal_mask(6, 3)
    tok = cv.block_causal_mask(6, 3, tokens_per_frame=4)
    assert tok.shape == (24, 24)
    for a in range(24):
        for b in range(24):
            assert tok[a, b] == frame_mask[a // 4, b // 4]


def test_mask_blocks():
    # chunk size 2, 4 frames: [[1100],[1100],[1111],[1111]]
    expect = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(cv.block_causal_mask(4, 2), expect)


# ---------------------------------------------------------------------------------------------
# 2. Causality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_student_is_block_causal(chunk):
    cfg = small_config()
    model, (x, t, text) = make_model(causal=True), inputs(cfg)
    K = cfg.chunk_size
    with torch.no_grad():
        before = model(x, t, text)
        x2, t2 = x.clone(), t.clone()
        x2[:, chunk * K : (chunk + 1) * K] += torch.randn_like(x2[:, chunk * K : (chunk + 1) * K])
        t2[:, chunk * K : (chunk + 1) * K] = (
            1000 - t2[:, chunk * K : (chunk + 1) * K]
        )  # new noise level too
        after = model(x2, t2, text)
    diff = (after - before).abs().amax(dim=(0, 2, 3, 4))  # per frame
    if chunk:
        assert diff[: chunk * K].max() == 0, diff  # the past: bitwise unchanged
    assert (diff[chunk * K :] > 1e-3).all(), diff  # the changed chunk and the future do change


def test_teacher_is_bidirectional():
    cfg = small_config()
    model, (x, t, text) = make_model(causal=False), inputs(cfg)
    with torch.no_grad():
        before = model(x, t, text)
        x2 = x.clone()
        x2[:, -1] += 1.0  # change only the last frame
        after = model(x2, t, text)
    diff = (after - before).abs().amax(dim=(0, 2, 3, 4))
    assert (diff > 1e-3).all(), diff  # every frame, the first included, sees the last


def test_student_rejects_partial_chunks():
    cfg = small_config()
    model, (x, t, text) = make_model(causal=True), inputs(cfg)
    with pytest.raises(ValueError, match="whole number of chunks"):
        model(x[:, :5], t[:, :5], text)


# ---------------------------------------------------------------------------------------------
# 3. KV-cache equivalence (Alg. 2 vs the masked training forward)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_kv_cache_matches_masked_forward(chunk_size):
    """Streaming chunk j over a cache of clean chunks 0..j-1 (filled at t = 0) must equal one masked
    forward over [clean chunks at t = 0, noisy chunk j at its per-frame t, anything after]."""
    cfg = small_config(chunk_size=chunk_size)
    model = make_model(causal=True, cfg=cfg)
    clean, t_noisy, text = inputs(cfg, seed=2)
    noisy = torch.randn_like(clean)
    K, L = cfg.chunk_size, cfg.num_frames // cfg.chunk_size
    cache = cv.KVCache()
    with torch.no_grad():
        for j in range(L):
            sl = slice(j * K, (j + 1) * K)
            streamed = model(noisy[:, sl], t_noisy[:, sl], text, cache=cache)
            x_full = torch.cat(
                [clean[:, : j * K], noisy[:, sl], torch.randn_like(clean[:, (j + 1) * K :])], 1
            )
            t_full = torch.cat(
                [torch.zeros_like(t_noisy[:, : j * K]), t_noisy[:, sl], t_noisy[:, (j + 1) * K :]],
                1,
            )
            full = model(x_full, t_full, text)[:, sl]
            assert (streamed - full).abs().max() <= 1e-5
            assert streamed.abs().max() > 1e-2  # not vacuous
            cv.fill_cache(model, cache, clean[:, sl], text)
            assert cache.num_frames == (j + 1) * K
    assert cache.num_tokens == cfg.num_frames * 4  # 4 tokens per frame


def test_stream_generate_equals_recomputing_the_prefix():
    """Alg. 2 with the cache vs the same algorithm recomputing the whole clean prefix
    with the mask."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=3)
    ts = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    chunks = list(
        cv.stream_generate(model, noise, text, ts, generator=torch.Generator().manual_seed(7))
    )
    assert len(chunks) == 3 and chunks[0].shape == (2, 2, 3, 8, 8)

    g, K, done = torch.Generator().manual_seed(7), cfg.chunk_size, []
    with torch.no_grad():
        for c in range(3):
            x = noise[:, c * K : (c + 1) * K]
            for j, t in enumerate(ts):
                ctx = torch.cat(done + [x], 1)
                tt = torch.cat([torch.zeros(2, c * K), torch.full((2, K), float(t))], 1)
                x0 = cv.predict_x0(model, ctx, tt, text)[:, -K:]
                if j + 1 < len(ts):
                    x = cv.add_noise(
                        x0, torch.randn(x0.shape, generator=g), torch.full((2, K), float(ts[j + 1]))
                    )
            done.append(x0)
    for a, b in zip(chunks, done):
        assert (a - b).abs().max() <= 1e-5


def stream(model, noise, text, ts, **kw):
    """Alg. 2's whole video (cv.stream_generate), re-noising from one seeded generator."""
    return torch.cat(
        list(cv.stream_generate(model, noise, text, ts, torch.Generator().manual_seed(7), **kw)), 1
    )


def windowed(model, noise, text, ts, **kw):
    """The same over the official re-encoding window (cv.windowed_generate)."""
    g = torch.Generator().manual_seed(7)
    return torch.cat(list(cv.windowed_generate(model, noise, text, ts, g, **kw)), 1)


TS = torch.tensor([1000.0, 750.0, 500.0])


def test_several_chunks_written_into_a_cache_see_each_other_block_causally():
    """fill_cache of two chunks at once (the re-encoding of a sliding window) + one streamed chunk
    equals the masked forward of all three."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    x, t, text = inputs(cfg, seed=4)
    cache = cv.KVCache()
    cv.fill_cache(model, cache, x[:, :4], text)
    with torch.no_grad():
        streamed = model(x[:, 4:], t[:, 4:], text, cache=cache)
        full = model(x, torch.cat([torch.zeros_like(t[:, :4]), t[:, 4:]], 1), text)[:, 4:]
    assert (streamed - full).abs().max() <= 1e-5 and streamed.abs().max() > 1e-2


def windowed_without_cache(model, noise, texts, ts, g, context, window, keep):
    """The official window scheme without a cache:
    each chunk recomputes the window's clean frames."""
    K, past, out = model.cfg.chunk_size, list(context.split(model.cfg.chunk_size, 1)), []
    for c, x in enumerate(noise.split(K, 1)):
        if (len(past) + 1) * K > window:
            past = past[-(keep // K) :]
        out.append(
            next(cv.recompute_generate(model, x, texts[c], ts, g, context=torch.cat(past, 1)))
        )
        past.append(out[-1])
    return torch.cat(out, 1)


def test_stream_with_context_window_and_chunk_iterator_equals_recomputing():
    """Every application runs through one loop; with the cache it must equal recomputing the past:
    I2V context, a sliding window with re-encoding, chunks fed from an iterator. (With a prompt that
    changes the two differ by design: cached frames keep the keys their own prompt gave them.)"""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 14, 3, 8, 8, generator=g)  # 7 chunks of 2
    context = torch.randn(2, 2, 3, 8, 8, generator=g)
    texts = [torch.randn(2, 5, 16, generator=g)] * 7
    cached = windowed(model, iter(noise.split(2, 1)), texts, TS, context=context, window=6, keep=2)
    uncached = windowed_without_cache(
        model, noise, texts, TS, torch.Generator().manual_seed(7), context, 6, 2
    )
    assert cached.shape == noise.shape and (cached - uncached).abs().max() <= 1e-5
    # without a window, recompute_generate is the whole baseline (Table 3), context included
    plain = torch.cat(
        list(
            cv.recompute_generate(
                model, noise, texts[0], TS, torch.Generator().manual_seed(7), context
            )
        ),
        1,
    )
    assert (stream(model, noise, texts[0], TS, context=context) - plain).abs().max() <= 1e-5


def with_past(model, past):
    """model over [past clean frames at t = 0, x], returning x's velocity
    (CFG's doubled batch too)."""

    def f(x, t, text):
        p = torch.cat([past] * (len(x) // len(past)))
        return model(
            torch.cat([p, x], 1), torch.cat([t.new_zeros(len(t), p.shape[1]), t], 1), text
        )[:, p.shape[1] :]

    return f


def test_causal_sampler_is_the_euler_cfg_sampler_chunk_by_chunk():
    """sample_ode_causal (Table 4's causal diffusion baseline) = sample_ode with CFG run chunk
    after chunk, each over the clean chunks before it: with the cache it equals recomputing the
    past, and its kept states are the chunks' ODE trajectories (the pairs of a causal teacher)."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=8)
    uncond = torch.randn(1, 5, 16)
    x0, kept = cv.sample_ode_causal(
        model, noise, text, uncond, 2.5, steps=6, shift=3.0, keep=(0, 3)
    )
    done, states = [], []
    for x in noise.split(2, 1):
        past = torch.cat(done, 1) if done else x[:, :0]
        ref, traj = cv.sample_ode(
            with_past(model, past), x, text, uncond, 2.5, steps=6, shift=3.0, keep=(0, 3)
        )
        done.append(ref)
        states.append(traj)
    assert (x0 - torch.cat(done, 1)).abs().max() <= 1e-4 and x0.abs().max() > 1e-2
    assert (
        kept.shape == (2, 3, *noise.shape[1:]) and (kept - torch.cat(states, 2)).abs().max() <= 1e-4
    )
    assert torch.equal(kept[:, 0], noise) and torch.equal(kept[:, -1], x0)


def test_dynamic_prompt_changes_only_what_follows():
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=6)
    other = torch.randn_like(text)
    same = stream(model, noise, text, TS)
    assert torch.equal(stream(model, noise, [text] * 3, TS), same)  # a per-chunk list of one prompt
    switched = stream(model, noise, [text, other, other], TS)
    assert torch.equal(switched[:, :2], same[:, :2])  # causal: the past never sees the new prompt
    assert (switched[:, 2:] - same[:, 2:]).abs().max() > 1e-2


def test_window_bounds_the_cache_and_the_positions(monkeypatch):
    """120-frame-long and 24-frame-long streams hold caches of the same peak size, a chunk never
    attends over more than the window,
    and no frame is ever encoded at a position past the window."""
    cfg = small_config(chunk_size=3, num_frames=12)
    model = make_model(causal=True, cfg=cfg)
    seen, attended = [], []
    real_attend, real_commit = cv.KVCache.attend_to, cv.KVCache.commit

    def attend_to(self, layer, k, v, rotation):
        out = real_attend(self, layer, k, v, rotation)
        attended.append((rotation.shape[0], out[0].shape[1], tuple(self.k[layer].shape)))
        return out

    monkeypatch.setattr(cv.KVCache, "attend_to", attend_to)
    monkeypatch.setattr(
        cv.KVCache,
        "commit",
        lambda self, f, n: real_commit(self, f, n) or seen.append(self.num_frames),
    )
    text = torch.randn(1, 5, 16)
    peaks = {}
    for frames in [24, 120]:
        seen.clear(), attended.clear()
        out = windowed(model, torch.randn(1, frames, 3, 8, 8), text, TS, window=12)
        assert out.shape[1] == frames and torch.isfinite(out).all()
        assert max(seen) <= 12 - 3  # the cache plus the chunk being made fit in the window
        assert (
            max(positions for positions, _, _ in attended) <= 12 * 4
        )  # RoPE positions stay inside it
        assert max(n for _, n, _ in attended) <= 12 * 4  # a chunk attends over at most the window
        peaks[frames] = max(buffer for _, _, buffer in attended)
    assert (
        peaks[24] == peaks[120] and peaks[24][1] <= 2 * 12 * 4
    )  # buffers grown by doubling, at most 2 windows


class ConcatKVCache(cv.KVCache):
    """The cache as it was before it was preallocated:
    torch.cat of the whole cache per layer per forward."""

    def attend_to(self, layer, k, v, rotation):
        k = cv.apply_rope(k, rotation[self.num_tokens :])
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
        self.pending = getattr(self, "pending", {})
        self.pending[layer] = (k, v)
        return k, v

    def commit(self, frames, tokens):
        super().commit(frames, tokens)
        for layer, (k, v) in self.pending.items():
            self.k[layer], self.v[layer] = k, v


def test_the_preallocated_cache_equals_concatenation_to_the_bit(monkeypatch):
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, B=3, seed=11)
    context = torch.randn(3, 2, 3, 8, 8)
    streams = []
    for cache in [cv.KVCache, ConcatKVCache]:
        monkeypatch.setattr(cv, "KVCache", cache)
        streams.append(stream(model, torch.cat([noise, noise], 1), text, TS, context=context))
    assert torch.equal(streams[0], streams[1])


def live_tensor_elements() -> int:
    """Elements of every tensor storage alive now (each storage counted once)."""
    import gc

    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in gc.get_objects()
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
    }  # (not compile's fakes)
    return sum(storages.values())


def test_sampling_end_to_end_streams_with_flat_memory(tmp_path):
    """utils.stream_video draws each chunk's noise when the stream reaches it and keeps nothing, and
    VideoWriter appends each chunk to the .gif and .mp4 (sample.py's loop): 300 frames streamed with
    a rolling cache hold the same bytes after chunk 20 as after chunk 150."""
    cfg = replace(
        small_config(chunk_size=2, num_frames=6), height=8, width=8, text_len=5, text_dim=16
    )
    model = make_model(causal=True, cfg=cfg)
    alive, text, cpu = {}, torch.randn(2, 5, 16), torch.device("cpu")
    make = utils.sampler(model, "student", cfg, cpu, generate=utils.streaming(window=8, sink=2))
    world = toy.ToyWorld(cfg, cpu)
    with utils.VideoWriter([str(tmp_path / "long.gif"), str(tmp_path / "long.mp4")]) as files:
        for c, chunk in enumerate(
            utils.stream_video(make, text, 300, world, seed=0, batch=1)
        ):  # 2 videos
            files.append(chunk)
            del chunk
            if c + 1 in (20, 150):
                alive[c + 1] = live_tensor_elements()
    assert alive[20] == alive[150], alive
    import imageio.v2 as imageio

    assert len(imageio.mimread(tmp_path / "long.mp4")) == 300


def test_cache_holds_post_rope_keys_at_their_positions():
    """A chunk streamed after c cached frames is encoded at time positions c.. (not 0..): its cached
    keys equal those of the same frames written in one go after the same past."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    x, _, text = inputs(cfg, seed=13)
    one, two = cv.KVCache(), cv.KVCache()
    cv.fill_cache(model, one, x, text)  # frames 0-5 at once
    cv.fill_cache(model, two, x[:, :4], text)
    cv.fill_cache(model, two, x[:, 4:], text)  # frames 4-5 after 4 cached frames
    for layer in one.k:
        assert (one.k[layer][:, 16:24] - two.k[layer][:, 16:24]).abs().max() <= 1e-5
    assert one.num_frames == two.num_frames == 6 and two.num_tokens == 24


# ---------------------------------------------------------------------------------------------
# 4. Parity with Wan's reference implementation (diffusers' WanTransformer3DModel)
# ---------------------------------------------------------------------------------------------


def diffusers_pair(seed=0):
    diffusers = pytest.importorskip("diffusers")
    cfg = small_config(
        patch_size=(1, 2, 2), dim=24, ffn_dim=40, num_heads=2, channels=4, text_dim=12, freq_dim=16
    )
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )
    randomize(ref, seed)
    ours = wan.from_diffusers_state_dict(cv.DiT(cfg), ref.state_dict()).eval()
    return cfg, ref, ours


def test_diffusers_parity_scalar_timestep():
    cfg, ref, ours = diffusers_pair()
    x, _, text = inputs(cfg)
    t = torch.tensor([873.0, 41.0])
    with torch.no_grad():
        theirs = ref(rearrange_in(x), t, text, return_dict=False)[0]
        mine = ours(x, t[:, None].expand(-1, cfg.num_frames), text)
    assert mine.abs().max() > 1e-2
    assert (rearrange_in(mine) - theirs).abs().max() <= 1e-4


def test_diffusers_parity_per_frame_timesteps():
    cfg, ref, ours = diffusers_pair(seed=1)
    x, t, text = inputs(cfg)
    N = (cfg.height // 2) * (cfg.width // 2)
    with torch.no_grad():
        theirs = ref(rearrange_in(x), t.repeat_interleave(N, dim=1), text, return_dict=False)[
            0
        ]  # per token
        mine = ours(x, t, text)
    assert (rearrange_in(mine) - theirs).abs().max() <= 1e-4


def rearrange_in(x):  # ours (B, F, C, H, W) <-> diffusers (B, C, F, H, W)
    return x.transpose(1, 2)


def test_our_names_are_wans_original_names():
    """diffusers' own converter for the original Wan2.1 checkpoint turns our state-dict names into
    exactly the names our table gives: an original checkpoint loads into our DiT unchanged."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = cv.DiT(small_config()).state_dict()
    converted = convert_wan_transformer_to_diffusers(dict(ours))
    assert set(converted) == {wan.diffusers_key(k) for k in ours}
    for k, v in ours.items():
        assert converted[wan.diffusers_key(k)] is v


def test_diffusers_loading_is_strict():
    cfg, ref, _ = diffusers_pair()
    state = dict(ref.state_dict())
    state.pop("blocks.0.attn1.to_q.weight")
    state["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="blocks.0.extra.weight"):
        wan.from_diffusers_state_dict(cv.DiT(cfg), state)
    del state["blocks.0.extra.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.0.self_attn.q.weight'\]"):
        wan.from_diffusers_state_dict(cv.DiT(cfg), state)


# ---------------------------------------------------------------------------------------------
# 5. Flow matching
# ---------------------------------------------------------------------------------------------


def test_velocity_x0_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.rand(3, 4, generator=g) * 999 + 1
    x_t = cv.add_noise(x0, eps, t)
    v = eps - x0
    assert torch.allclose(cv.velocity_to_x0(x_t, v, t), x0, atol=1e-5)
    assert torch.allclose(x0_to_velocity(x_t, x0, t), v, atol=1e-3)
    # the end points of the path: t = 0 is data, t = 1000 is noise
    assert torch.equal(cv.add_noise(x0, eps, torch.zeros(3, 4)), x0)
    assert torch.equal(cv.add_noise(x0, eps, torch.full((3, 4), 1000.0)), eps)


def test_shift_and_student_steps():
    assert torch.allclose(
        cv.shift_timesteps(torch.tensor([0.0, 500.0, 1000.0]), 8.0),
        torch.tensor([0.0, 8000 / 9, 1000.0]),
    )
    wan = cv.student_timesteps(cv.get_config("wan2.1-t2v-1.3b"))
    assert torch.allclose(
        wan, torch.tensor([1000.0, 756.76, 521.74]), atol=0.01
    )  # official [1000, 757, 522]
    four = cv.student_timesteps(
        cv.get_config("wan2.1-t2v-1.3b", teacher_steps=48, student_step_indices=(0, 12, 24, 36))
    )
    assert torch.allclose(
        four, torch.tensor([1000.0, 960.0, 888.89, 727.27]), atol=0.01
    )  # the 4-step variant
    assert torch.allclose(
        cv.student_timesteps(cv.get_config("tiny")), torch.tensor([1000.0, 900.0, 750.0, 500.0])
    )


def gaussian_velocity(mu, a):
    """Exact E[eps - x0 | x_t] for data x0 ~ N(mu, a^2) under x_t = (1 - s) x0 + s eps."""

    def v(x, t, text=None):
        s = cv._s(t, x)
        var = (1 - s) ** 2 * a**2 + s**2
        r = (x - (1 - s) * mu) / var
        return s * r - (mu + (1 - s) * a**2 * r)

    return v


def test_euler_sampler_lands_on_the_known_answer():
    """For Gaussian data the probability-flow ODE is x_s = (1 - s) mu + sqrt((1 - s)^2 a^2 + s^2) z:
    the sampler must carry noise z to mu + a z, passing the kept states on the way."""
    mu, a = 1.5, 0.3
    z = torch.randn(64, 3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x0, traj = cv.sample_ode(
        gaussian_velocity(mu, a), z, None, steps=800, shift=3.0, keep=(0, 200, 600)
    )

    def err(x):
        return (x - (mu + a * z)).abs().max().item()

    assert err(x0) < 1e-2
    # Euler is first order: 4x the steps, ~4x less error
    coarse = cv.sample_ode(gaussian_velocity(mu, a), z, None, steps=200, shift=3.0)[0]
    assert 3.5 < err(coarse) / err(x0) < 4.5
    ts = cv.sampling_schedule(800, 3.0)
    assert traj.shape == (64, 4, 3, 1, 2, 2)
    for n, i in enumerate((0, 200, 600)):
        s = float(ts[i]) / 1000
        exact = (1 - s) * mu + math.sqrt((1 - s) ** 2 * a**2 + s**2) * z
        assert (traj[:, n] - exact).abs().max() < 1e-2
    assert torch.equal(traj[:, -1], x0)


def test_cfg_combines_cond_and_uncond():
    def model(x, t, text):
        return text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1).expand_as(x)

    x, t = torch.zeros(2, 1, 1, 1, 1), torch.zeros(2, 1)
    cond, uncond = torch.full((2, 3, 4), 2.0), torch.full((1, 3, 4), 0.5)
    v = cv.guided_velocity(model, x, t, cond, uncond, 3.0)
    assert torch.allclose(v, torch.full_like(x, 0.5 + 3.0 * 1.5))


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    """With degenerate data (a point mass at mu) the exact velocity is known at every x_t, so the
    loss of the exact field is 0 and that of a wrong field is not."""
    mu = 0.7

    def exact(x, t, text):
        return (x - mu) / cv._s(t, x)  # eps - mu, with eps = (x - (1 - s) mu) / s

    x0, t = torch.full((8, 2, 1, 3, 3), mu), torch.rand(8, 2) * 900 + 50
    assert cv.flow_matching_loss(exact, x0, t, None) < 1e-8
    assert cv.flow_matching_loss(lambda x, t, text: torch.zeros_like(x), x0, t, None) > 0.5


# ---------------------------------------------------------------------------------------------
# 6. DMD moves a generator toward the teacher's distribution
# ---------------------------------------------------------------------------------------------


class AffineGenerator(torch.nn.Module):
    """x0 = b + c z in 2-D:
    a generator whose output distribution N(b, c^2) is known in closed form."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor([-1.0, 2.0]))
        self.c = torch.nn.Parameter(torch.tensor([0.2, 1.5]))

    def forward(self, z):  # z (B, 1, 2, 1, 1)
        return self.b.view(1, 1, 2, 1, 1) + self.c.view(1, 1, 2, 1, 1) * z


def dmd_gaussian_setup():
    cfg = cv.get_config("tiny", shift=1.0)
    mu = torch.tensor([1.0, -0.5]).view(1, 1, 2, 1, 1)
    a = torch.tensor([0.5, 0.5]).view(1, 1, 2, 1, 1)
    teacher = gaussian_velocity(mu, a)  # the real score s_data
    gen = AffineGenerator()

    def critic(x, t, text):  # exact s_gen
        return gaussian_velocity(
            gen.b.detach().view(1, 1, 2, 1, 1), gen.c.detach().abs().view(1, 1, 2, 1, 1)
        )(x, t)

    return cfg, mu, a, teacher, gen, critic


def dmd(x0, teacher, critic, cfg):
    """The generator's DMD loss at Alg. 1 line 8's random t, no text, no CFG."""
    t = cv.dmd_timesteps(len(x0), x0.shape[1], cfg.shift, cfg.dmd_t_min, cfg.dmd_t_max)
    return cv.dmd_loss(x0, t, teacher, critic, None)


def test_dmd_gradient_points_toward_the_teacher():
    torch.manual_seed(0)
    cfg, mu, a, teacher, gen, critic = dmd_gaussian_setup()
    z = torch.randn(4096, 1, 2, 1, 1)
    loss, _ = dmd(gen(z), teacher, critic, cfg)
    loss.backward()
    # gradient descent must move b towards mu (-1 -> 1 up, 2 -> -0.5 down)
    # and c towards a (0.2 up, 1.5 down)
    assert gen.b.grad[0] < 0 and gen.b.grad[1] > 0
    assert gen.c.grad[0] < 0 and gen.c.grad[1] > 0


def test_dmd_steps_shrink_the_gap():
    torch.manual_seed(0)
    cfg, mu, a, teacher, gen, critic = dmd_gaussian_setup()

    def gap():
        return ((gen.b - mu.flatten()).abs().sum() + (gen.c.abs() - a.flatten()).abs().sum()).item()

    start = gap()
    opt = torch.optim.SGD(gen.parameters(), lr=0.5)
    for _ in range(200):
        loss, _ = dmd(gen(torch.randn(256, 1, 2, 1, 1)), teacher, critic, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap() < 0.1 * start, (start, gap(), gen.b, gen.c)


def test_dmd_loss_value_and_gradient_form():
    """0.5 mse(x0, x0 - g) has value 0.5 mean(g^2) and gradient g / n: the surrogate of Eq. 4."""
    cfg = cv.get_config("tiny")
    x0 = torch.randn(2, 3, 1, 2, 2, requires_grad=True)

    def fake(x, t, text):
        return torch.zeros_like(x)

    def real(x, t, text):
        return torch.ones_like(x)

    loss, _ = dmd(x0, real, fake, cfg)
    loss.backward()
    g = x0.grad * x0.numel()  # the gradient is g / n; scale it back
    assert torch.allclose(loss, 0.5 * (g.double() ** 2).mean(), rtol=1e-5)
    # fake_x0 - real_x0 = s > 0 everywhere: descent lowers x0 toward the real score's estimate
    assert (g > 0).all()


def test_dmd_timesteps_follow_their_shift():
    """Alg. 1 line 8's t ~ U[0, 1000) shifted: dmd_shift 1 is uniform, a larger shift moves mass
    to high noise."""
    torch.manual_seed(0)
    for shift, median in [
        (1.0, 500.0),
        (3.0, 750.0),
        (8.0, 8000 / 9),
    ]:  # shift_timesteps of the uniform median 500
        t = cv.dmd_timesteps(20000, 3, shift, 0.0, 1000.0)
        assert t.shape == (20000, 3) and (t == t[:, :1]).all()
        assert abs(t[:, 0].median().item() - median) < 10, shift


def test_dmd_diagnostics_read_what_dmd_sees():
    """training.dmd_diagnostics: the critic that knows the generator's distribution fits its samples
    better than the teacher does (equal when the critic is the teacher); the gradient's RMS per
    chunk, per student step it was made from, and over the chunks given clean."""
    torch.manual_seed(0)
    cfg, mu, a, teacher, gen, critic = dmd_gaussian_setup()
    x0 = gen(torch.randn(4096, 2, 2, 1, 1)).detach()  # 2 frames, chunks of 1
    grad = torch.ones_like(x0)
    grad[:, 1] = 2.0
    ts = torch.tensor([1000.0, 500.0])
    t_in = torch.tensor([1000.0, 0.0]).expand(
        4096, 2
    )  # chunk 0 made from step 0, chunk 1 given clean
    t = torch.rand(4096, 1).expand(-1, 2) * 1000
    d = training.dmd_diagnostics(x0, t_in, grad, t, teacher, critic, None, ts, chunk_size=1)
    assert d["critic_fm"] < 0.9 * d["teacher_fm"]
    assert d["grad_chunk0"] == pytest.approx(1.0) and d["grad_chunk1"] == pytest.approx(2.0)
    assert d["grad_step0"] == pytest.approx(1.0) and d["grad_clean"] == pytest.approx(2.0)
    assert math.isnan(d["grad_step1"])  # nothing was made from t = 500
    same = training.dmd_diagnostics(x0, t_in, grad, t, teacher, teacher, None, ts, chunk_size=1)
    assert same["critic_fm"] == pytest.approx(same["teacher_fm"], rel=1e-6)


def test_interval_means_leave_out_what_never_happened():
    logs = {
        "critic": [1.0, 2.0, 3.0],
        "grad_step2": [math.nan, 4.0, math.nan],
        "grad_step3": [math.nan] * 3,
    }
    assert training.interval_means(logs) == {"critic": 2.0, "grad_step2": 4.0} and logs == {}


def test_distance_from_the_initial_weights():
    model = torch.nn.Linear(3, 2)
    init = training.local_parameters(model)
    assert training.distance_from(model, init) == 0.0
    with torch.no_grad():
        model.bias += torch.tensor([3.0, 4.0])
    norm = math.sqrt(sum(float(p.pow(2).sum()) for p in init))
    assert training.distance_from(model, init) == pytest.approx(5.0 / norm, rel=1e-5)


def test_critic_loss_trains_only_the_critic():
    cfg = small_config()
    critic = make_model(causal=False, cfg=cfg)
    x, _, text = inputs(cfg)
    x_gen = x.clone().requires_grad_(True)
    loss = cv.critic_loss(critic, x_gen, torch.full((2, cfg.num_frames), 500.0), text)
    loss.backward()
    assert x_gen.grad is None
    assert all(p.grad is not None for p in critic.parameters())


def test_ode_regression_loss_uses_per_chunk_steps():
    """A student that returns the exact x0 whatever its input has zero loss; per-chunk timesteps are
    constant inside a chunk and vary between chunks."""
    torch.manual_seed(0)
    B, Fr, K, Q = 64, 6, 2, 4
    traj = torch.randn(B, Q + 1, Fr, 1, 2, 2)
    ts = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    seen = []

    def student(x_t, t, text):
        seen.append(t)
        return x0_to_velocity(x_t, traj[:, -1], t)  # predicts exactly x0

    assert cv.ode_regression_loss(student, traj, None, ts, K) < 1e-8
    t = seen[0]
    assert (t.view(B, Fr // K, K) == t.view(B, Fr // K, K)[..., :1]).all()
    assert (t[:, 0] != t[:, K]).any()
    # and the student's inputs are the trajectory states at those timesteps
    idx = cv.chunkwise_step_indices(3, Fr, K, Q, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (3, Fr) and idx.max() < Q


def test_clean_context_chunks_in_ode_regression():
    """clean_context (the official trailing 0): some chunks are the trajectory's clean end point at
    t = 0, as context; they are left out of the loss. Without it no chunk is ever at t = 0."""
    torch.manual_seed(0)
    B, Fr, K, Q = 64, 6, 2, 4
    traj = torch.randn(B, Q + 1, Fr, 1, 2, 2)
    ts = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    seen = []

    def student(x_t, t, text):  # exact on noisy chunks, far off on clean ones (were they scored)
        seen.append((x_t, t))
        return x0_to_velocity(x_t, traj[:, -1], t) + 100.0 * (t == 0).float()[..., None, None, None]

    assert cv.ode_regression_loss(student, traj, None, ts, K, clean_context=True) < 1e-8
    x_t, t = seen[-1]
    clean = t == 0
    assert 0.1 < clean.float().mean() < 0.3  # 1 in Q + 1 chunks
    assert torch.equal(x_t[clean], traj[:, -1][clean])  # the clean end point itself
    assert cv.ode_regression_loss(student, traj, None, ts, K, clean_context=False) < 1e-8
    assert (seen[-1][1] > 0).all()
    # a student wrong on the noisy chunks is caught, with or without clean context
    assert cv.ode_regression_loss(lambda x, t, text: torch.zeros_like(x), traj, None, ts, K) > 0.1


def test_backward_simulation_records_the_rollout():
    """DMD2 Sec. 4.5: the states are what Alg. 2 fed the student -- pure noise at the first step,
    then its own re-noised estimates -- and, last, the clip it streamed; chunkwise_states draws
    each chunk's step from them (and, with clean_context, the clean clip)."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    _, _, text = inputs(cfg)
    ts = torch.tensor([1000.0, 750.0, 500.0])
    noise = torch.randn(
        2,
        cfg.num_frames,
        cfg.channels,
        cfg.height,
        cfg.width,
        generator=torch.Generator().manual_seed(5),
    )
    states = cv.backward_simulation(model, noise, text, ts, torch.Generator().manual_seed(7))
    assert states.shape == (2, 4, *noise.shape[1:])
    assert torch.equal(states[:, 0], noise)  # every chunk starts from its noise at t = 1000
    streamed = torch.cat(
        list(cv.stream_generate(model, noise, text, ts, torch.Generator().manual_seed(7))), 1
    )
    assert torch.equal(states[:, -1], streamed)  # the same rollout, ending in the streamed clip
    # step 1 of chunk 0 is its step-0 estimate re-noised to t = 750: not noise, not the output
    assert not torch.equal(states[:, 1], states[:, 0]) and not torch.equal(
        states[:, 1], states[:, -1]
    )
    torch.manual_seed(0)
    many = states.repeat(16, 1, 1, 1, 1, 1)
    x_t, t = cv.chunkwise_states(many, ts, cfg.chunk_size)
    assert set(t.unique().tolist()) == {0.0, 500.0, 750.0, 1000.0}
    for value, j in [(1000.0, 0), (750.0, 1), (500.0, 2), (0.0, 3)]:
        assert torch.equal(x_t[t == value], many[:, j][t == value])


def test_clean_context_chunks_in_dmd_generator_input():
    """Alg. 1 lines 4-7 with clean_context: a chunk drawn at t = 0 is the data chunk itself, and the
    generator's x0 there is exactly the data (no gradient); the other chunks are noised."""
    torch.manual_seed(0)
    B, Fr, K = 64, 6, 2
    data = torch.randn(B, Fr, 1, 2, 2)
    ts = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    seen = []
    weight = torch.zeros((), requires_grad=True)

    def generator(x_t, t, text):
        seen.append((x_t, t))
        return weight * x_t

    x0, t_in = cv.generator_x0(generator, data, None, ts, K, clean_context=True)
    x_t, t = seen[-1]
    clean = t == 0
    assert 0.1 < clean.float().mean() < 0.3
    assert (t.view(B, Fr // K, K) == t.view(B, Fr // K, K)[..., :1]).all()  # per chunk
    assert torch.equal(x_t[clean], data[clean]) and torch.equal(x0[clean], data[clean])
    assert torch.equal(t_in, t)  # it says which step each frame was made from
    assert not torch.equal(x_t[~clean], data[~clean])
    x0[clean].sum().backward()
    assert weight.grad == 0  # clean chunks pass no gradient to the generator
    cv.generator_x0(generator, data, None, ts, K, clean_context=False)
    assert (seen[-1][1] > 0).all()


# ---------------------------------------------------------------------------------------------
# Text encoder and checkpoints
# ---------------------------------------------------------------------------------------------


def test_tiny_text_encoder():
    cfg = cv.get_config("tiny")
    enc = toy.tiny_text_encoder(cfg)
    out = enc(["a red circle moving left", ""])
    assert out.shape == (2, cfg.text_len, cfg.text_dim)
    n = len("a red circle moving left") + 1  # bytes + </s>
    assert (
        out[0, n:].abs().max() == 0 and out[0, :n].abs().min() > 0
    )  # zero padding after the prompt
    assert out[1, 1:].abs().max() == 0  # "" is </s> alone
    again = toy.tiny_text_encoder(cfg)(
        ["a red circle moving left"]
    )  # seeded: the same encoder every time
    assert torch.equal(again[0], out[0])
    assert not any(p.requires_grad for p in enc.parameters())


def test_checkpoint_round_trip(tmp_path):
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    path = str(tmp_path / "m.safetensors")
    training.save_model(path, model, step=3)
    loaded = utils.load_model(path)
    assert loaded.causal and loaded.cfg == cfg
    x, t, text = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, t, text), loaded(x, t, text))
    assert utils.load_checkpoint(path)[2]["step"] == 3


def test_fresh_model_predicts_zero_velocity():
    """adaLN-Zero: the output layer starts at zero."""
    cfg = small_config()
    x, t, text = inputs(cfg)
    assert cv.DiT(cfg)(x, t, text).abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Training-time kernels: FlexAttention for the block mask, gradient checkpointing
# ---------------------------------------------------------------------------------------------


def test_flex_attention_block_mask_equals_the_dense_mask():
    """What runs on CUDA (FlexAttention with a BlockMask built from Eq. 5), checked on CPU in eager
    mode against SDPA with the dense mask: a whole clip, and two chunks written after a cache."""
    import warnings

    cfg = small_config(num_frames=6, chunk_size=2)
    model = make_model(causal=True, cfg=cfg)
    x, t, text = inputs(cfg, seed=9)
    with torch.no_grad():
        dense = model(x, t, text)
        cache = cv.KVCache()
        cv.fill_cache(model, cache, x[:, :2], text)
        dense_cached = model(x[:, 2:], t[:, 2:], text, cache=cache)
        model.attention = "flex"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
            flex = model(x, t, text)
            cache = cv.KVCache()
            cv.fill_cache(model, cache, x[:, :2], text)
            flex_cached = model(x[:, 2:], t[:, 2:], text, cache=cache)
    assert (flex - dense).abs().max() <= 1e-4 and (flex_cached - dense_cached).abs().max() <= 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    grads = []
    for checkpointing in [False, True]:
        model = make_model(causal=True, cfg=cfg).train()
        model.gradient_checkpointing = checkpointing
        x, t, text = inputs(cfg, seed=10)
        model(x, t, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 and grads[0].abs().max() > 0
