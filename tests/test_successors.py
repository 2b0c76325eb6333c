"""CausVid's successors (successors.py), each proven on its own: the rolling KV cache with a sink,
Self-Forcing's rollout through the cache, Causal Forcing's teacher forcing."""

import pytest
import torch
from test_core import TS, inputs, live_tensor_elements, make_model, small_config, stream

import causvid as cv
import successors


def rolling(model, noise, text, ts, **kw):
    """Alg. 2's whole video over a RollingKVCache (successors.rolling_generate)."""
    g = torch.Generator().manual_seed(7)
    return torch.cat(list(successors.rolling_generate(model, noise, text, ts, g, **kw)), 1)


# ---------------------------------------------------------------------------------------------
# The rolling KV cache with an attention sink
# ---------------------------------------------------------------------------------------------


def test_the_rolling_cache_equals_the_full_forward_within_its_window_and_stays_bounded():
    """RollingKVCache (sink + recent frames, keys rotated when read): while the video fits in the
    window it is the plain cache, hence the masked full forward; over 300 frames its memory and its
    positions stay bounded."""
    cfg = small_config(chunk_size=2, num_frames=6)
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=12)
    plain = stream(model, noise, text, TS)
    rolled = rolling(model, noise, text, TS, window=6, sink=2)  # 6 frames: no eviction yet
    assert (plain - rolled).abs().max() <= 1e-5 and plain.abs().max() > 1e-2
    cache = successors.RollingKVCache(sink=2, window=8, chunk_size=2)
    x = torch.randn(1, 2, 3, 8, 8)
    sizes = set()
    with torch.no_grad():
        for c in range(150):  # 300 frames
            model(x + c / 150, torch.full((1, 2), 500.0), text[:1], cache=cache)  # a denoising step
            cv.fill_cache(model, cache, x + c / 150, text[:1])
            sizes.add((cache.num_frames, tuple(cache.k[0].shape)))
            if c == 0:
                sink = cache.k[0][:, :8].clone()  # the first chunk's keys, before RoPE
    assert max(n for n, _ in sizes) == 8 - 2 and len({shape for _, shape in sizes}) <= 3  # bounded
    assert torch.equal(cache.k[0][:, :8], sink)  # the sink stays at the front, untouched
    with pytest.raises(ValueError, match="must leave room"):
        successors.RollingKVCache(sink=6, window=8, chunk_size=2)


@pytest.mark.parametrize("max_gap", [0, 2, -1])
def test_the_rolling_caches_positions_keep_the_sink_at_0_and_the_recent_frames_after_a_gap(
    max_gap, monkeypatch
):
    """RoPE positions a chunk sees in a RollingKVCache (sink 2, window 8, chunks of 2): the sink at
    0, 1; the recent frames `gap` positions after it, gap = the frames evicted so far up to max_gap
    (0: contiguous; -1: all of them, the frames' absolute positions); the chunk right after them."""
    cfg = small_config(chunk_size=2, num_frames=6)
    model = make_model(causal=True, cfg=cfg)
    N = 2 * 2  # tokens per frame (8x8 in patches of 4)
    table = cv.rope_angles(cfg.dim // cfg.num_heads, 64, 2, 2)  # angles of frames 0..63
    seen, real = [], successors.RollingKVCache.visible
    monkeypatch.setattr(
        successors.RollingKVCache,
        "visible",
        lambda self, rotation: seen.append(real(self, rotation)) or seen[-1],
    )
    cache = successors.RollingKVCache(sink=2, window=8, chunk_size=2, max_gap=max_gap)
    x = torch.randn(1, 2, 3, 8, 8)
    text = torch.randn(1, 5, 16)
    with torch.no_grad():
        for _c in range(10):  # 20 frames: after chunk c, 2 (c + 1) frames streamed
            cv.fill_cache(model, cache, x, text)
    evicted = 20 - cache.num_frames
    gap = {0: 0, 2: 2, -1: evicted}[max_gap]
    assert cache.gap == gap and cache.num_frames == 6
    seen.clear()
    with torch.no_grad():
        model(x, torch.full((1, 2), 500.0), text, cache=cache)  # the next chunk
    frames = [0, 1] + list(range(2 + gap, 6 + gap)) + [6 + gap, 7 + gap]  # sink, recent, the chunk
    angles = table.unflatten(0, (64, N))[frames].flatten(0, 1)
    expect = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    assert [r.shape[0] for r in seen] == [len(frames) * N] * cfg.num_layers, [r.shape for r in seen]
    assert all((r - expect).abs().max() <= 1e-6 for r in seen)


def test_without_a_sink_the_position_scheme_does_not_matter():
    """RoPE makes attention depend on the distance between two positions only, so a rolling cache
    with no sink streams the same video whether its frames keep their absolute positions
    (sink_gap -1) or are re-based to contiguous ones (0): with nothing before the gap, the gap
    shifts every key and query alike. Not to the bit: the angles of later frames are larger numbers,
    rounded to fp32 in the complex rotation (~1e-7 relative of angles up to 30 rad, ~3e-6),
    amplified by 2 layers and 3 steps x 15 chunks of feedback (1.4e-6 measured) -- 1e-4 leaves
    room; with a sink, where the gap does move keys against each other, the two schemes differ by
    ~1e-2."""
    cfg = small_config(chunk_size=2, num_frames=6)
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=13)
    noise = torch.randn(
        noise.shape[0], 30, *noise.shape[2:], generator=torch.Generator().manual_seed(14)
    )
    contiguous, absolute = (
        rolling(model, noise, text, TS, window=6, sink=0, sink_gap=g) for g in (0, -1)
    )
    assert (contiguous - absolute).abs().max() <= 1e-4 and contiguous.abs().max() > 1e-2
    sunk = rolling(model, noise, text, TS, window=6, sink=2, sink_gap=-1)
    assert (
        rolling(model, noise, text, TS, window=6, sink=2) - sunk
    ).abs().max() > 1e-3  # with a sink it does


def test_a_rolling_stream_holds_constant_memory_once_its_window_is_full():
    """stream_generate with a RollingKVCache keeps nothing but the cache: the tensors alive while
    the stream is suspended after chunk 20 and after chunk 150 (300 frames) are the same bytes."""
    cfg = small_config(chunk_size=2, num_frames=6)
    model = make_model(causal=True, cfg=cfg)
    text = torch.randn(1, 5, 16)
    chunks = (torch.randn(1, 2, 3, 8, 8) for _ in range(150))  # noise as the stream reaches it
    alive = {}
    g = torch.Generator().manual_seed(7)
    for c, x0 in enumerate(
        successors.rolling_generate(model, chunks, text, TS, g, window=8, sink=2)
    ):
        del x0  # the caller keeps nothing
        if c + 1 in (20, 150):
            alive[c + 1] = live_tensor_elements()
    assert alive[20] == alive[150], alive


# ---------------------------------------------------------------------------------------------
# Causal Forcing: the causal teacher's teacher forcing
# ---------------------------------------------------------------------------------------------


def test_teacher_forcing_loss_is_the_cached_samplers_step():
    """Causal Forcing's objective: chunk c's flow-matching loss equals that of the model run on
    chunk c over a KV cache filled with the clean chunks before it -- what sample_ode_causal runs --
    and the chunks after c never enter (changing them changes neither the loss nor its gradient)."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    x0, _, text = inputs(cfg)
    t, K = torch.tensor([300.0, 800.0]), cfg.chunk_size
    for c in range(cfg.num_frames // K):
        torch.manual_seed(c)
        loss = successors.teacher_forcing_loss(model, x0, t, text, c, K)
        torch.manual_seed(c)
        eps = torch.randn_like(x0[:, : (c + 1) * K])[:, -K:]
        cache = cv.KVCache()
        if c:
            cv.fill_cache(model, cache, x0[:, : c * K], text)
        chunk, tc = x0[:, c * K : (c + 1) * K], t[:, None].expand(-1, K)
        with torch.no_grad():  # (the cache serves inference)
            v = model(cv.add_noise(chunk, eps, tc), tc, text, cache=cache)
        assert torch.allclose(
            loss, torch.nn.functional.mse_loss(v, eps - chunk), rtol=1e-5, atol=1e-7
        ), c
    later = x0.clone()
    later[:, K:] = torch.randn_like(later[:, K:]) * 5  # everything after chunk 0
    grads = []
    for x in (x0, later):
        model.zero_grad()
        torch.manual_seed(0)
        successors.teacher_forcing_loss(model, x, t, text, 0, K).backward()
        grads.append(model.head.head.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Self-Forcing: DMD on the student's own rollout, through the cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 2])
def test_self_forcing_rollout_is_the_students_own_stream_with_gradient_through_one_step(step):
    """The rollout's chunks are exactly Alg. 2's x0 at student step s (stream_generate stopped
    there, the same noise draws), and the gradient is that of step s's forward of each chunk given
    its detached past -- nothing flows through the earlier steps, the cache or other chunks' inputs.
    Gradient checkpointing gives the same gradient
    (a forward with gradient never writes the cache)."""
    cfg = small_config()
    noise, _, text = inputs(cfg, seed=14)
    grads = []
    for checkpointing in [False, True]:
        model = make_model(causal=True, cfg=cfg).train()
        model.gradient_checkpointing = checkpointing
        out = successors.self_forcing_rollout(
            model, noise, text, TS, torch.Generator().manual_seed(3), step=step
        )
        streamed = torch.cat(
            list(
                cv.stream_generate(
                    model, noise, text, TS[: step + 1], torch.Generator().manual_seed(3)
                )
            ),
            1,
        )
        assert (out - streamed).abs().max() <= 1e-5 and out.requires_grad
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        (out * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    # the reference: each chunk's step-s forward alone,
    # over a cache of the streamed (detached) chunks
    model = make_model(causal=True, cfg=cfg).train()
    g, cache, total = torch.Generator().manual_seed(3), successors.RolloutKVCache(), 0
    for c, x in enumerate(noise.split(2, 1)):
        with torch.no_grad():
            if step:
                x = cv.renoise(
                    cv.denoise_chunk(model, x, text, TS[:step], cache, g)[0], float(TS[step]), g
                )
        x0 = cv.predict_x0(model, x, torch.full((2, 2), float(TS[step])), text, cache=cache)
        total = total + (x0 * weights[:, 2 * c : 2 * c + 2]).sum()
        cv.fill_cache(model, cache, x0.detach(), text)
    total.backward()
    for p, a, b in zip(model.parameters(), *grads):
        assert (p.grad - a).abs().max() <= 1e-5 * (1 + a.abs().max()) and (
            a - b
        ).abs().max() <= 1e-5 * (1 + a.abs().max())
    assert any(a.abs().max() > 0 for a in grads[0])


def test_a_forward_with_gradient_never_writes_the_rollout_cache_and_the_plain_cache_refuses_it():
    """Self-Forcing's step with gradient attends over its RolloutKVCache without writing into it, so
    a checkpointed block recomputed in backward cannot change what later chunks saw; the cache is
    written only under no_grad (fill_cache). CausVid's KVCache, which serves inference, refuses a
    forward with gradient in one line instead of corrupting autograd later."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg).train()
    model.gradient_checkpointing = True
    x, _, text = inputs(cfg, seed=16)
    plain = cv.KVCache()
    cv.fill_cache(model, plain, x[:, :2], text)
    with pytest.raises(RuntimeError, match="serves inference .* RolloutKVCache"):
        model(x[:, 2:4], torch.full((2, 2), 500.0), text, cache=plain)
    cache = successors.RolloutKVCache()
    cv.fill_cache(model, cache, x[:, :2], text)
    for buffer in [*cache.k.values(), *cache.v.values()]:
        buffer[:, cache.num_tokens :] = (
            7.0  # the free slot the next chunk's keys would be written to
        )
    before = {layer: (k.clone(), cache.v[layer].clone()) for layer, k in cache.k.items()}
    out = model(x[:, 2:4], torch.full((2, 2), 500.0), text, cache=cache)
    out.square().mean().backward()
    assert cache.num_frames == 2 and all(
        torch.equal(k, cache.k[layer]) and torch.equal(v, cache.v[layer])
        for layer, (k, v) in before.items()
    )
    assert all(not k.requires_grad for k in cache.k.values())


def test_self_forcing_passes_no_gradient_to_the_noise_or_the_past():
    """At step 0 a chunk's input is its noise: the rollout's chunk c depends on noise chunk c only
    through its own step-0 forward, never on the noise of the chunks before it (their outputs enter
    the cache detached)."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=15)
    noise.requires_grad_(True)
    out = successors.self_forcing_rollout(model, noise, text, TS, step=0)
    out[:, 4:].sum().backward()  # the last chunk
    assert noise.grad[:, :4].abs().max() == 0 and noise.grad[:, 4:].abs().max() > 0
