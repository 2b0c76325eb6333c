"""CausVid's successors (successors.py), each proven on its own: the rolling KV cache with a sink,
Self-Forcing's rollout through the cache, Causal Forcing's teacher forcing."""

import pytest
import torch
from test_core import TS, inputs, live_tensor_elements, make_model, small_config, stream, windowed

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


# ---------------------------------------------------------------------------------------------
# The first chunk: steps of its own (Diagonal Distillation, Causal Forcing++), the teacher's (bound)
# ---------------------------------------------------------------------------------------------

FIRST = (0, 3, 6, 9, 12, 15, 18, 21)  # 8 steps for chunk 0 on the toy's 24-step schedule


def counting(model, calls):
    """The model, recording each forward's (frames, t of its first frame, cached or not)."""

    def forward(x, t, text, **kw):
        calls.append((x.shape[1], float(t[0, 0]), kw.get("write_cache", False)))
        return model(x, t, text, **kw)

    forward.cfg = model.cfg
    return forward


def test_chunk_schedule_gives_chunk_0_its_own_steps_and_the_rest_the_students():
    """successors.chunk_schedule: with first_chunk_step_indices, chunk 0 runs those points of the
    teacher's shifted schedule, every later chunk the student's; without, the student's tensor;
    `below` keeps the steps at or under a t (video-to-video)."""
    cfg = cv.Config(first_chunk_step_indices=FIRST)
    full = cv.sampling_schedule(24, cfg.shift).float()
    schedule = successors.chunk_schedule(cfg)
    assert torch.equal(schedule(0), full[list(FIRST)])
    for c in (1, 2, 3, 40):
        assert torch.equal(schedule(c), cv.student_timesteps(cfg))
    assert torch.equal(successors.chunk_schedule(cv.Config()), cv.student_timesteps(cv.Config()))
    low = successors.chunk_schedule(cfg, below=float(full[12]))
    assert torch.equal(low(0), full[[12, 15, 18, 21]]) and torch.equal(low(1), full[[12, 18]])


def test_a_first_chunk_with_its_own_steps_streams_as_the_masked_forward_and_caches_it_clean():
    """Under the lever, Alg. 2 makes chunk 0 in its own steps and every later chunk in the
    student's (counted forwards); the KV-cached stream equals the recomputed masked forward
    (recompute_generate) and the windowed stream; and after chunk 0 the cache holds what CausVid's
    holds: chunk 0's clean output run at t = 0."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=21)
    first = torch.tensor([1000.0, 900.0, 750.0, 600.0, 500.0, 250.0])
    schedule = lambda c: first if c == 0 else TS  # noqa: E731
    calls = []
    g = torch.Generator().manual_seed(7)
    streamed = torch.cat(
        list(cv.stream_generate(counting(model, calls), noise, text, schedule, g)), 1
    )
    steps = [t for _, t, cached in calls if not cached]
    assert steps == first.tolist() + TS.tolist() * 2
    assert [t for _, t, cached in calls if cached] == [0.0, 0.0]  # chunks 0 and 1, clean
    g = torch.Generator().manual_seed(7)
    recomputed = torch.cat(list(cv.recompute_generate(model, noise, text, schedule, g)), 1)
    assert (streamed - recomputed).abs().max() <= 1e-5 and streamed.abs().max() > 1e-2
    assert (windowed(model, noise, text, schedule, window=6) - streamed).abs().max() <= 1e-5
    calls.clear()  # a window that slides keeps the video's chunk index: chunk 2 is not a chunk 0
    windowed(counting(model, calls), noise, text, schedule, window=4)
    assert [t for _, t, cached in calls if not cached] == first.tolist() + TS.tolist() * 2
    cache, fresh = cv.KVCache(), cv.KVCache()
    stream = cv.stream_generate(
        model, noise, text, schedule, torch.Generator().manual_seed(7), cache=cache
    )
    chunk0 = next(stream)
    next(stream)  # chunk 0 enters the cache when chunk 1 starts
    cv.fill_cache(model, fresh, chunk0, text)
    n = fresh.num_tokens
    assert all(torch.equal(cache.k[i][:, :n], fresh.k[i][:, :n]) for i in fresh.k)


def test_the_rollout_trains_the_first_chunk_at_a_step_of_its_own_schedule():
    """Self-Forcing's rollout under the lever: chunk 0 exits at its own step (drawn from its own
    list), the others at the shared step; the clip is the stream stopped there; the t each frame was
    made from is its chunk's exit step. One shared draw where every chunk has the student's steps,
    as before the lever."""
    cfg = small_config()
    model = make_model(causal=True, cfg=cfg)
    noise, _, text = inputs(cfg, seed=22)
    first = torch.tensor([1000.0, 900.0, 750.0, 600.0, 500.0, 250.0])
    schedule = lambda c: first if c == 0 else TS  # noqa: E731
    out = successors.self_forcing_rollout(
        model, noise, text, schedule, torch.Generator().manual_seed(3), step=[4, 1, 1]
    )
    stopped = lambda c: first[:5] if c == 0 else TS[:2]  # noqa: E731
    ref = cv.stream_generate(model, noise, text, stopped, torch.Generator().manual_seed(3))
    assert (out - torch.cat(list(ref), 1)).abs().max() <= 1e-5
    draws = [successors.rollout_steps(5, it, schedule, 3) for it in range(200)]
    assert {d[0] for d in draws} == set(range(6)) and {d[1] for d in draws} == set(range(3))
    assert all(d[1] == d[2] for d in draws)
    g = torch.Generator().manual_seed(5 * 7919 + 17)  # the draw before the lever: one for all
    assert successors.rollout_steps(5, 17, TS, 3) == [int(torch.randint(3, (1,), generator=g))] * 3
    x0_of = successors.self_forcing_input(5, torch.device("cpu"), schedule)
    x0, t = x0_of(model, noise, text, TS, torch.Generator().manual_seed(1), 17)
    s = successors.rollout_steps(5, 17, schedule, 3)
    assert t[0].tolist() == [float(first[s[0]])] * 2 + [float(TS[s[1]])] * 4


def test_the_bound_makes_chunk_0_by_the_causal_teachers_sampler_and_streams_the_rest_over_it():
    """successors.first_chunk_generate with teacher_first_chunk: chunk 0 is sample_ode_causal's,
    to the bit; the chunks after it are the student's stream with chunk 0 as cached context, the
    same whether the past is cached or recomputed under the mask; image-to-video's context reaches
    the teacher's cache."""
    cfg = small_config()
    student = make_model(causal=True, cfg=cfg, seed=1)
    teacher = make_model(causal=True, cfg=cfg, seed=2)
    noise, _, text = inputs(cfg, seed=23)
    uncond = torch.randn(1, *text.shape[1:], generator=torch.Generator().manual_seed(4))
    first = successors.teacher_first_chunk(teacher, uncond, 3.0, 6, 3.0)
    made = {}
    for name, then in [("cached", cv.stream_generate), ("recomputed", cv.recompute_generate)]:
        g = torch.Generator().manual_seed(7)
        out = successors.first_chunk_generate(student, noise, text, TS, g, first=first, then=then)
        made[name] = torch.cat(list(out), 1)
    x0, _ = cv.sample_ode_causal(teacher, noise[:, :2], text, uncond, 3.0, 6, 3.0)
    assert torch.equal(made["cached"][:, :2], x0)
    assert (made["cached"] - made["recomputed"]).abs().max() <= 1e-5
    image = torch.randn(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with_image = successors.first_chunk_generate(
        student, noise, text, TS, None, image, first=first, then=cv.stream_generate
    )
    ref, _ = cv.sample_ode_causal(teacher, noise[:, :2], text, uncond, 3.0, 6, 3.0, context=image)
    assert torch.equal(next(with_image), ref) and not torch.equal(ref, x0)


# ---------------------------------------------------------------------------------------------
# Causal Forcing++: causal consistency distillation
# ---------------------------------------------------------------------------------------------


def test_the_consistency_target_is_the_teachers_euler_step_then_the_targets_x0():
    """consistency_loss on models whose outputs are known in closed form, computed by hand: x_t =
    (1 - s) x + s eps; the teacher's CFG velocity v = v_u + g (v_c - v_u); one Euler step
    x' = x_t + (s' - s) v; the goal x' - s' v_target(x'); the prediction x_t - s v_student(x_t);
    their mean squared difference. Every network sees the clean past at t = 0 before the chunk."""
    K, chunk = 2, 1
    x0 = torch.randn(2, 6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    text = torch.ones(2, 5, 4)
    uncond = torch.zeros(1, 5, 4)
    seen = []

    def net(a, b):  # v = a x + b s + (text mean); records what it is run on
        def velocity(x, t, txt):
            seen.append((x[:, : chunk * K].clone(), t[:, : chunk * K].clone()))
            s = (t / 1000)[..., None, None, None]
            return a * x + b * s + txt.mean((1, 2))[:, None, None, None, None]

        return velocity

    teacher, target, student = net(0.5, 1.0), net(-0.3, 2.0), net(0.2, -1.0)
    t, t_next = torch.tensor([800.0, 400.0]), torch.tensor([700.0, 250.0])
    torch.manual_seed(3)
    loss = successors.consistency_loss(
        student, target, teacher, x0, text, uncond, 3.0, t, t_next, chunk, K
    )
    torch.manual_seed(3)
    x = x0[:, 2:4]
    eps = torch.randn_like(x)
    s, s2 = (t / 1000)[:, None, None, None, None], (t_next / 1000)[:, None, None, None, None]
    x_t = (1 - s) * x + s * eps
    v_c = 0.5 * x_t + 1.0 * s + 1.0
    v_u = 0.5 * x_t + 1.0 * s + 0.0
    v = v_u + 3.0 * (v_c - v_u)
    x_next = x_t + (s2 - s) * v
    goal = x_next - s2 * (-0.3 * x_next + 2.0 * s2 + 1.0)
    pred = x_t - s * (0.2 * x_t - 1.0 * s + 1.0)
    assert torch.allclose(loss, (pred - goal).pow(2).mean(), rtol=1e-5, atol=1e-7)
    for past, t_past in seen:
        assert torch.equal(past, torch.cat([x0[:, :2]] * (len(past) // 2))) and not t_past.any()


def test_the_consistency_grid_holds_the_students_steps_and_trains_the_student_only():
    """The grid is the teacher's schedule at consistency_grid points (48: the toy's 4 student steps
    at every 12th); a step's gradient reaches the student, not the frozen teacher or the target."""
    cfg = cv.Config()
    grid = successors.consistency_grid(cfg)
    assert len(grid) == 48 and torch.equal(grid[[0, 12, 24, 36]], cv.student_timesteps(cfg))
    small = small_config(teacher_steps=6, student_step_indices=(0, 3), consistency_grid=12)
    student = make_model(causal=True, cfg=small, seed=1)
    teacher = make_model(causal=True, cfg=small, seed=2)  # trainable: the loss must not train it
    target = make_model(causal=True, cfg=small, seed=3)
    x0, _, text = inputs(small, seed=24)
    loss = successors.consistency_step(
        student, target, teacher, x0, text, text[:1], small, torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert loss > 0 and all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *target.parameters()])
