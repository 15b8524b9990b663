import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import randomize_, tiny_config
import model
from model import (DiT, DiTConfig, apply_rope, check_objective, diffusion_loss, generate, get_noise_schedule,
                   guided_prediction, logsnr_times, rope_2d, sample_t, solve)

def named_sampler(name):
    """model.SAMPLERS[name] run on a given x_T, as generate() runs it: solve() on its time grid, at its order."""
    times, second_order = model.SAMPLERS[name]

    @torch.no_grad()
    def sample(net, schedule, x_T, y, steps, **kwargs):
        return solve(net, schedule, x_T, y, times(schedule, steps), second_order=second_order, **kwargs)

    sample.__name__ = name
    return sample

ddim_sample, dpm_solver_sample = named_sampler("ddim"), named_sampler("dpm++2m")

SCHEDULES = [
    ("linear", {}),
    ("cosine", {}),
    ("cosine", dict(start=0.2, end=1.0, tau=2.0)),
    ("sigmoid", {}),
    ("sigmoid", dict(start=0.0, end=3.0, tau=0.5)),
]
SAMPLERS = [ddim_sample, dpm_solver_sample]
# every schedule with every prediction that makes sense with it (check_objective)
OBJECTIVES = [(name, params, p) for name, params in SCHEDULES for p in ("eps", "v")] + [
    ("flow", {}, "velocity"), ("flow", {}, "v")
]

# --- the network -------------------------------------------------------------

@pytest.mark.parametrize(
    "shape, patch_size",
    [((3, 32, 32), 2), ((16, 4, 4), 1)],  # CIFAR pixels; latents of a 16-channel f8 VAE
    ids=["pixels", "latents"],
)
def test_forward_backward_shapes(shape, patch_size):
    C, H, W = shape
    config = tiny_config(input_size=H, in_channels=C, patch_size=patch_size, num_classes=10)
    model = randomize_(DiT(config))
    x = torch.randn(5, C, H, W)
    t = torch.rand(5)
    y = torch.tensor([0, 3, 9, 10, 10])  # 10 = no class
    out = model(x, t, y)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    assert model.pos_embed.shape == (1, (H // patch_size) * (W // patch_size), config.n_embd)

def test_init_is_identity():
    model = DiT(tiny_config(num_classes=10))
    x = torch.randn(4, 3, 8, 8)
    t, y = torch.rand(4), torch.tensor([0, 1, 2, 10])
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # the output layer starts at zero
    tokens = torch.randn(4, 16, 32)
    class_token = model.class_embed(y)[:, None]
    time_modulation = torch.randn(4, 6, 32)  # even a non-zero shared modulation: the gates are per block
    time_modulation[:, [2, 5]] = 0
    rope, skip = (model.rope_cos, model.rope_sin), torch.randn_like(tokens)
    for block in model.blocks:  # gates start at zero: a block passes on its input (merged with its long skip, if any)
        merged = block.skip(torch.cat([tokens, skip], dim=-1)) if block.skip is not None else tokens
        assert torch.equal(block(tokens, class_token, time_modulation, rope, skip), merged)
    randomize_(model)
    assert not torch.allclose(model.blocks[0](tokens, class_token, time_modulation, rope), tokens)

def test_long_skips_join_mirror_blocks():
    """U-ViT's wiring: with 5 blocks, block 4 gets block 0's output and block 3 block 1's; blocks 0-2 get none."""
    model = randomize_(DiT(tiny_config(n_layer=5)))
    inputs, outputs = {}, {}

    def record(i):
        def hook(module, args, out):
            inputs[i], outputs[i] = args[4:], out
        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(record(i))
    model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert [len(inputs[i]) and inputs[i][0] is not None for i in range(5)] == [False, False, False, True, True]
    assert inputs[3][0] is outputs[1] and inputs[4][0] is outputs[0]

def test_rope_depends_only_on_relative_position():
    """A query and a key rotated for patches (r1, c1) and (r2, c2) meet in the same dot product as for any two patches
    the same rows and columns apart, and the rotation keeps their length."""
    cos, sin = rope_2d(head_dim=16, grid_size=6)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rotated = lambda v, r, c: apply_rope(v, cos[r * 6 + c].double(), sin[r * 6 + c].double())  # noqa: E731
    dots = [rotated(q, r, c) @ rotated(k, r + 2, c - 1) for r, c in [(0, 1), (1, 3), (3, 5)]]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-6), dots
    assert not torch.allclose(rotated(q, 0, 1) @ rotated(k, 2, 0), rotated(q, 0, 1) @ rotated(k, 0, 2), atol=1e-3)
    assert torch.allclose(rotated(q, 4, 2).norm(), q.norm(), atol=1e-6)

def test_muon_takes_the_blocks_matrices():
    model = DiT(tiny_config(n_layer=3))
    muon, adamw = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", optimizer="muon")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    held = [p for o in (muon, adamw) for group in o.param_groups for p in group["params"]]
    assert sorted(map(id, held)) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    matrices = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {n for n, p in model.named_parameters() if any(p is q for q in muon.param_groups[0]["params"])} == {
        n for n in matrices if not n.endswith(".modulation")}
    assert len(model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")) == 1
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose adamw or muon"):
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", optimizer="sgd")

def test_class_and_time_change_the_output():
    model = randomize_(DiT(tiny_config(num_classes=3)))
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    a = model(x, t, torch.tensor([0, 0]))
    assert not torch.allclose(a, model(x, t, torch.tensor([1, 1])))
    assert not torch.allclose(a, model(x, torch.full((2,), 0.6), torch.tensor([0, 0])))

def test_config_validation():
    with pytest.raises(ValueError, match="prediction must be 'v', 'eps' or 'velocity'"):
        DiTConfig(prediction="x0")
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(input_size=6, patch_size=4)

def test_flops_estimate_matches_counter():
    """The analytic estimate against torch's own count of a forward pass (matmuls,
    convolutions and attention). The counter cannot see inside the fused CPU attention
    kernel, so attention runs as the plain math version here."""
    for overrides in [dict(), dict(input_size=32, n_embd=64, n_head=4, n_layer=3)]:
        model = DiT(tiny_config(**overrides))
        c = model.config
        x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model(x, torch.rand(2), torch.tensor([0, 1]))
        counted = counter.get_total_flops() / 2
        estimate = model.flops_per_image(training=False)
        assert abs(estimate - counted) / counted < 0.01, (estimate, counted)
        assert model.flops_per_image(training=True) == 3 * estimate

# --- noise schedules -------------------------------------------------------------
# The paper's reference code (Chen 2023, arXiv 2301.10972, Algorithm 1), in numpy,
# written out separately as the independent reference.

def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))

def reference_gamma(name, t, start=None, end=None, tau=1.0, clip_min=1e-9):
    if name == "linear":
        return np.clip(1 - t, clip_min, 1.0)
    if name == "cosine":
        start, end = (0.0 if start is None else start), (1.0 if end is None else end)
        v_start = math.cos(start * math.pi / 2) ** (2 * tau)
        v_end = math.cos(end * math.pi / 2) ** (2 * tau)
        output = np.cos((t * (end - start) + start) * math.pi / 2) ** (2 * tau)
        return np.clip((v_end - output) / (v_end - v_start), clip_min, 1.0)
    start, end = (-3.0 if start is None else start), (3.0 if end is None else end)
    v_start, v_end = _np_sigmoid(start / tau), _np_sigmoid(end / tau)
    output = _np_sigmoid((t * (end - start) + start) / tau)
    return np.clip((v_end - output) / (v_end - v_start), clip_min, 1.0)

@pytest.mark.parametrize("name, params", SCHEDULES)
def test_schedule_matches_paper(name, params):
    schedule = get_noise_schedule(name, **params)
    t = np.linspace(0, 1, 101)
    gamma = schedule.gamma(torch.tensor(t)).numpy()
    np.testing.assert_allclose(gamma, reference_gamma(name, t, **params), rtol=1e-10, atol=1e-12)
    assert abs(gamma[0] - 1) < 1e-9 and gamma[-1] < 1e-6
    assert (np.diff(gamma) <= 0).all() and (np.diff(gamma[:-1]) < 0).all()
    assert gamma.min() > 0  # clip_min keeps sqrt(gamma) away from zero

def test_schedule_closed_forms():
    t = torch.tensor([0.3, 0.5], dtype=torch.float64)
    assert torch.allclose(get_noise_schedule("linear").gamma(t), torch.tensor([0.7, 0.5], dtype=torch.float64))
    assert abs(get_noise_schedule("cosine").gamma(t)[1] - 0.5) < 1e-12  # cos(pi/4)^2
    assert abs(get_noise_schedule("sigmoid").gamma(t)[1] - 0.5) < 1e-12  # symmetric around 0
    # sigmoid(-1.5) at t=0.25 with the default start=-3, end=3
    expected = (_np_sigmoid(3) - _np_sigmoid(-1.5)) / (_np_sigmoid(3) - _np_sigmoid(-3))
    assert abs(get_noise_schedule("sigmoid").gamma(torch.tensor(0.25)).item() - expected) < 1e-6

def test_alpha_sigma():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for name, params in SCHEDULES:
        schedule = get_noise_schedule(name, **params)
        alpha, sigma = schedule.alpha_sigma(t)
        assert torch.allclose(alpha**2, schedule.gamma(t)) and torch.allclose(alpha**2 + sigma**2, torch.ones_like(t))
    alpha, sigma = get_noise_schedule("flow").alpha_sigma(t)
    assert torch.equal(alpha, 1 - t) and torch.equal(sigma, t)  # the straight line from data to noise

def test_objective_checks():
    for name, params, prediction in OBJECTIVES:
        check_objective(get_noise_schedule(name, **params), prediction)
    with pytest.raises(ValueError, match="'velocity' is the rectified-flow target.*noise_schedule='flow'"):
        check_objective(get_noise_schedule("cosine"), "velocity")
    with pytest.raises(ValueError, match="'eps' cannot work with noise_schedule='flow'.*'velocity'"):
        check_objective(get_noise_schedule("flow"), "eps")
    with pytest.raises(ValueError, match="'flow' takes no parameters, not tau"):
        get_noise_schedule("flow", tau=2.0)

def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'.*sigmoid, flow"):
        get_noise_schedule("quadratic")
    with pytest.raises(ValueError, match="takes clip_min"):
        get_noise_schedule("linear", tau=2.0)
    with pytest.raises(ValueError, match="input_scale"):
        get_noise_schedule("cosine", input_scale=0)

def test_t_sampling():
    g = torch.Generator().manual_seed(0)
    for how in ["uniform", "logit_normal"]:
        t = sample_t(20000, how, "cpu", g)
        assert 0 <= t.min() and t.max() <= 1
        assert abs(t.mean() - 0.5) < 0.01
    # logit-normal concentrates in the middle: P(0.25 < t < 0.75) = P(|n| < log 3) ~ 0.73
    t = sample_t(20000, "logit_normal", "cpu", g)
    assert abs(((t > 0.25) & (t < 0.75)).float().mean() - 0.7281) < 0.02
    with pytest.raises(ValueError):
        sample_t(4, "beta", "cpu")

# --- loss ----------------------------------------------------------------------

def target(prediction, x0, eps, alpha, sigma):
    """What a model with this prediction should output, written out here independently."""
    return {"eps": eps, "v": alpha * eps - sigma * x0, "velocity": eps - x0}[prediction]

class Oracle(torch.nn.Module):
    """A "model" that knows the one image of its dataset and returns the exact
    prediction (eps, v or velocity) for any x_t, computed in float64."""

    def __init__(self, x0, schedule, prediction, num_classes=2):
        super().__init__()
        self.x0, self.schedule = x0.double(), schedule
        self.config = SimpleNamespace(prediction=prediction, num_classes=num_classes)
        self.calls = []

    def forward(self, x_t, t, y):
        self.calls.append(t.clone())
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in self.schedule.alpha_sigma(t.double()))
        x0 = self.x0 * self.schedule.input_scale
        eps = (x_t.double() - alpha * x0) / sigma
        return target(self.config.prediction, x0, eps, alpha, sigma).float()

class GaussianOracle(Oracle):
    """The exact prediction for data x0 ~ N(mu, s^2) in every pixel: with x0' = b x0,
    E[x0' | x_t] = b mu + alpha b^2 s^2 / (alpha^2 b^2 s^2 + sigma^2) (x_t - alpha b mu).
    Along the probability-flow ODE (x_t - alpha b mu) / sqrt(alpha^2 b^2 s^2 + sigma^2) stays
    constant, so the exact sample from x_T is known in closed form too."""

    def __init__(self, mu, s, schedule, prediction):
        super().__init__(torch.zeros(1), schedule, prediction)
        self.mu, self.s = mu, s

    def forward(self, x_t, t, y):
        self.calls.append(t.clone())
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in self.schedule.alpha_sigma(t.double()))
        b, x_t = self.schedule.input_scale, x_t.double()
        mean, var = b * self.mu, (b * self.s) ** 2
        x0 = mean + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mean)
        eps = (x_t - alpha * x0) / sigma
        return target(self.config.prediction, x0, eps, alpha, sigma).float()

    def exact_sample(self, x_T):
        alpha, sigma = (c.item() for c in self.schedule.alpha_sigma(torch.ones((), dtype=torch.float64)))
        b = self.schedule.input_scale
        z = (x_T.double() - alpha * b * self.mu) / math.sqrt(alpha**2 * (b * self.s) ** 2 + sigma**2)
        return self.mu + self.s * z

@pytest.mark.parametrize("name, prediction", [("cosine", "eps"), ("cosine", "v"), ("flow", "velocity"), ("flow", "v")])
def test_loss_is_zero_for_the_oracle(name, prediction):
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    schedule = get_noise_schedule(name, input_scale=0.7)
    oracle = Oracle(x0, schedule, prediction)
    g = torch.Generator().manual_seed(0)
    loss = diffusion_loss(oracle, schedule, x0.expand(64, -1, -1, -1), torch.zeros(64, dtype=torch.long), generator=g)
    assert loss < 1e-8
    # with all-zero data the eps and velocity targets are the noise itself: a model that
    # predicts zeros has loss E[eps^2] = 1; v = alpha eps has less
    zero = Oracle(x0, schedule, prediction)
    zero.forward = lambda x_t, t, y: torch.zeros_like(x_t)
    loss = diffusion_loss(zero, schedule, torch.zeros(512, 3, 8, 8), torch.zeros(512, dtype=torch.long), generator=g)
    assert abs(loss.item() - 1) < 0.02 if prediction != "v" else loss.item() < 0.9

def test_class_dropout_replaces_labels():
    seen = []
    x0 = torch.zeros(1000, 3, 8, 8)
    schedule = get_noise_schedule("cosine")
    model = Oracle(x0[:1], schedule, "v", num_classes=5)
    model.forward = lambda x_t, t, y: (seen.append(y), torch.zeros_like(x_t))[1]
    y = torch.randint(0, 5, (1000,))
    diffusion_loss(model, schedule, x0, y, class_dropout=0.3, generator=torch.Generator().manual_seed(0))
    dropped = seen[0] == 5
    assert abs(dropped.float().mean() - 0.3) < 0.05
    assert torch.equal(seen[0][~dropped], y[~dropped])
    diffusion_loss(model, schedule, x0, y, class_dropout=0.0)
    assert torch.equal(seen[1], y)

# --- samplers against closed forms ---------------------------------------------
# For Gaussian data x0 ~ N(mu, s^2) in every pixel the exact prediction is known (GaussianOracle), and
# so is the exact sample the probability-flow ODE maps x_T to: what remains is the sampler's own error.

def steps_error(sampler, model, schedule, x_T, steps, **kwargs):
    exact = model.exact_sample(x_T)
    y = torch.zeros(len(x_T), dtype=torch.long)
    return (sampler(model, schedule, x_T, y, steps=steps, **kwargs).double() - exact).abs().max().item()

@pytest.mark.parametrize("input_scale", [1.0, 0.5])
@pytest.mark.parametrize("name, params, prediction", OBJECTIVES)
def test_order_of_accuracy_on_every_path(name, params, prediction, input_scale):
    """Halving the step size halves DDIM's error (first order) and quarters DPM-Solver++(2M)'s (second order), and
    DPM-Solver++ is far closer at equal steps: on every path, with every target it can learn."""
    schedule = get_noise_schedule(name, input_scale=input_scale, **params)
    model = GaussianOracle(mu=0.3, s=0.5, schedule=schedule, prediction=prediction)
    x_T = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # (DDIM's ratio nears 2 from below, slowly where the schedule is steep near t = 1; DPM-Solver++'s error is the same
    # on every VP schedule, as its grid is uniform in log-SNR, and its first and last steps are first order)
    ddim = [steps_error(ddim_sample, model, schedule, x_T, n) for n in (40, 80, 160)]
    dpm = [steps_error(dpm_solver_sample, model, schedule, x_T, n) for n in (20, 40, 80)]
    assert all(1.4 < a / b < 2.2 for a, b in zip(ddim, ddim[1:])), ddim
    assert all(3.0 < a / b < 8.0 for a, b in zip(dpm, dpm[1:])), dpm
    assert dpm[1] < ddim[0] / 5, (dpm, ddim)  # at 40 steps each

def test_a_first_order_dpm_solver_would_fail():
    """The order test has teeth: DPM-Solver++ without its second-order correction is first order."""
    schedule = get_noise_schedule("cosine")
    model = GaussianOracle(mu=0.3, s=0.5, schedule=schedule, prediction="v")
    x_T = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def first_order(model, schedule, x_T, y, steps):
        return solve(model, schedule, x_T, y, logsnr_times(schedule, steps))

    e = [steps_error(first_order, model, schedule, x_T, n) for n in (20, 40, 80)]
    assert all(1.6 < a / b < 2.4 for a, b in zip(e, e[1:])), e  # so it fails the (3, 8) of the real one

def ancestral_moments(schedule, steps, mu, s, eta):
    """Mean and std of DDIM's output for data N(mu, s^2) from x_T ~ N(0, 1), exactly: every step is affine in x,
    x_next = P x + Q + f z, with f the std of DDPM's posterior q(x_next | x, x0), so the moments follow a recursion."""
    b = schedule.input_scale
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alphas, sigmas = (c.tolist() for c in schedule.alpha_sigma(ts))
    alphas[-1], sigmas[-1] = 1.0, 0.0
    mean, var, m, v = b * mu, (b * s) ** 2, 0.0, 1.0
    for a, sg, an, sn in zip(alphas, sigmas, alphas[1:], sigmas[1:]):
        k = a * var / (a**2 * var + sg**2)  # x0_hat = mean + k (x - a mean)
        f = eta * math.sqrt(max(sn**2 - (a / an) ** 2 * sn**4 / sg**2, 0.0))  # sigma_n^2 (1 - (a sigma_n / (a_n sigma))^2)
        c = math.sqrt(max(sn**2 - f**2, 0.0)) / sg  # the weight of eps_hat = (x - a x0_hat) / sigma
        P, Q = an * k + c * (1 - a * k), (an - c * a) * (mean - k * a * mean)
        m, v = P * m + Q, P**2 * v + f**2
    return m / b, math.sqrt(v) / b

@pytest.mark.parametrize("name, params, prediction", OBJECTIVES)
def test_ddim_noise_matches_ddpm_posterior(name, params, prediction):
    """With eta = 1, DDIM's samples have exactly the mean and spread that DDPM's posterior noise gives (closed form
    above, checked on 40,000 values), and with more steps the spread approaches the data's."""
    schedule = get_noise_schedule(name, input_scale=0.5, **params)
    model = GaussianOracle(mu=0.3, s=0.5, schedule=schedule, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2500, 1, 4, 4, generator=g)
    y = torch.zeros(2500, dtype=torch.long)
    spreads = []
    for steps in (8, 32):
        out = ddim_sample(model, schedule, x_T, y, steps=steps, eta=1.0, noise=lambda: torch.randn(x_T.shape, generator=g))
        mean, std = ancestral_moments(schedule, steps, 0.3, 0.5, eta=1.0)
        assert abs(out.mean().item() - mean) < 0.01 and abs(out.std().item() / std - 1) < 0.015, (steps, out.std(), std)
        spreads.append(std)
    assert spreads[0] < spreads[1] < 0.5

def test_guidance_formula_at_one_step():
    """Two Gaussians, the class's and the unconditional one: one step from t = 0.6 to 0 lands on the guided guess of
    x0, uncond + w (cond - uncond), which is linear in the network's output for every target."""
    for name, params, prediction in OBJECTIVES:
        schedule = get_noise_schedule(name, input_scale=0.7, **params)
        cond, uncond = (GaussianOracle(mu=m, s=0.4, schedule=schedule, prediction=prediction) for m in (0.5, -0.2))

        class TwoGaussians(torch.nn.Module):
            config = SimpleNamespace(prediction=prediction, num_classes=1)

            def forward(self, x_t, t, y):
                return torch.where((y == 0).view(-1, 1, 1, 1), cond(x_t, t, y), uncond(x_t, t, y))

        x = torch.randn(8, 3, 4, 4)
        ts = torch.tensor([0.6, 0.0], dtype=torch.float64)
        out = solve(TwoGaussians(), schedule, x, torch.zeros(8, dtype=torch.long), ts, cfg_scale=2.5)
        a, sg = (c.item() for c in schedule.alpha_sigma(ts[:1]))
        b, var = 0.7, (0.7 * 0.4) ** 2
        x0 = {m: b * m + a * var / (a**2 * var + sg**2) * (x.double() - a * b * m) for m in (0.5, -0.2)}
        expected = (x0[-0.2] + 2.5 * (x0[0.5] - x0[-0.2])) / b
        assert torch.allclose(out.double(), expected, atol=1e-5), (name, prediction, (out - expected).abs().max())
        # autoguidance: the weaker output is the guide's, told no class (here a guide that always answers -0.2's)
        out = solve(TwoGaussians(), schedule, x, torch.zeros(8, dtype=torch.long), ts, cfg_scale=2.5, guide=uncond)
        assert torch.allclose(out.double(), expected, atol=1e-5), (name, prediction, (out - expected).abs().max())

def test_trajectory_and_the_first_evaluation_at_pure_noise():
    for name, params, prediction in OBJECTIVES:
        schedule = get_noise_schedule(name, input_scale=0.5, **params)
        model = GaussianOracle(mu=0.3, s=0.5, schedule=schedule, prediction=prediction)
        x_T = torch.randn(3, 3, 4, 4)
        for sampler in SAMPLERS:
            model.calls.clear()
            out, path = sampler(model, schedule, x_T, torch.zeros(3, dtype=torch.long), steps=6, trajectory=True)
            assert len(path["x_t"]) == 7 and len(path["x0_pred"]) == 6 and len(model.calls) == 6
            assert torch.equal(path["x_t"][0], x_T / 0.5) and torch.equal(path["x_t"][-1], out)
            # at t = 1 exactly (alpha ~3e-5 or 0) the guess of x0 is finite and right: the data's mean
            assert model.calls[0][0].item() == 1.0
            assert (path["x0_pred"][0] - 0.3).abs().max() < (2e-2 if prediction == "eps" else 1e-4)

def test_logsnr_times():
    for name, params in SCHEDULES + [("flow", {})]:
        schedule = get_noise_schedule(name, **params)
        ts = logsnr_times(schedule, 10)
        assert ts[0] == 1.0 and ts[-1] == 0.0 and (ts.diff() < 0).all()
        alpha, sigma = schedule.alpha_sigma(ts[1:-1])
        lambdas = alpha.log() - sigma.log()  # the inner points: -4, -3, ..., 4
        assert torch.allclose(lambdas, torch.arange(-4.0, 5.0, dtype=torch.float64), atol=1e-9), lambdas
    assert logsnr_times(get_noise_schedule("cosine"), 1).tolist() == [1.0, 0.0]

def test_ddim_is_deterministic_at_eta_0_and_noisy_at_eta_1():
    model = randomize_(DiT(tiny_config()), scale=0.05).eval()
    schedule = get_noise_schedule("cosine")
    x_T, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    a = ddim_sample(model, schedule, x_T, y, steps=4)
    assert torch.equal(a, ddim_sample(model, schedule, x_T, y, steps=4))
    noisy = [ddim_sample(model, schedule, x_T, y, steps=4, eta=1.0, noise=lambda g=torch.Generator().manual_seed(s): torch.randn(
        x_T.shape, generator=g)) for s in (0, 0, 1)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], noisy[2]) and not torch.allclose(a, noisy[0])
    assert ddim_sample(model, schedule, x_T, y, steps=1).shape == x_T.shape
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(model, schedule, x_T, y, steps=0)

def test_each_image_has_its_own_noise_whatever_the_batch():
    """generate(): image i's x_T and DDIM's fresh noise come from its own stream, so batch size does not matter."""
    model = randomize_(DiT(tiny_config(num_classes=3)), scale=0.05).eval()
    schedule, labels = get_noise_schedule("cosine"), torch.tensor([0, 1, 2, 0, 1])
    for kwargs in [dict(sampler="ddim", eta=1.0), dict(sampler="ddim"), dict(sampler="dpm++2m")]:
        runs = [generate(model, schedule, labels, (3, 8, 8), seed=3, batch_size=n, steps=4, cfg_scale=1.5, **kwargs) for n in (5, 2, 1)]
        assert all(torch.allclose(runs[0], r, atol=1e-6) for r in runs[1:]), kwargs
        tail = generate(model, schedule, labels[3:], (3, 8, 8), seed=3, indices=range(3, 5), steps=4, cfg_scale=1.5, **kwargs)
        assert torch.allclose(tail, runs[0][3:], atol=1e-6)  # a large set can be made in pieces

def test_images_of_one_class_differ():
    """Every image starts from its own noise: samples of one class, from any model (the untrained one included, whose
    samples are its starting noise), differ pairwise; so do those of different seeds."""
    schedule, labels = get_noise_schedule("flow"), torch.zeros(6, dtype=torch.long)
    for model in (DiT(tiny_config(prediction="velocity")), randomize_(DiT(tiny_config(prediction="velocity")), scale=0.05)):
        for sampler in ("ddim", "dpm++2m"):
            runs = [generate(model.eval(), schedule, labels, (3, 8, 8), seed=seed, batch_size=4, steps=3, sampler=sampler)
                    for seed in (0, 1)]
            for images in (runs[0], torch.cat(runs)):
                distances = torch.cdist(images.flatten(1), images.flatten(1))  # (N, N), between every pair
                off_diagonal = distances[~torch.eye(len(images), dtype=torch.bool)]
                assert off_diagonal.min() > 0.1 * off_diagonal.mean(), (sampler, distances)

def test_ddim_clip_x0():
    schedule = get_noise_schedule("cosine")
    x_T, y = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    x0 = torch.full((1, 3, 8, 8), 3.0)  # outside [-1, 1]: clipping must pull the sample in
    out = ddim_sample(Oracle(x0, schedule, "eps"), schedule, x_T, y, steps=5, clip_x0=1.0)
    assert out.abs().max() <= 1.0 + 1e-5
    # An eps-model that is off by 1e-3 at t=1, where sqrt(gamma) ~ 3e-5: without clipping
    # the first x0 prediction is ~30 times the data's range; with it, the sample is fine.
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    imperfect = Oracle(x0, schedule, "eps")
    exact_forward = imperfect.forward
    imperfect.forward = lambda x_t, t, y: exact_forward(x_t, t, y) + 1e-3
    _, trajectory = ddim_sample(imperfect, schedule, x_T, y, steps=20, trajectory=True)
    assert trajectory["x0_pred"][0].abs().max() > 10
    out = ddim_sample(imperfect, schedule, x_T, y, steps=20, clip_x0=1.0)
    assert (out - x0).abs().max() < 0.05

# --- guidance ----------------------------------------------------------------------

def test_guidance():
    model = randomize_(DiT(tiny_config(num_classes=4))).eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 2, 3])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 4))
    assert torch.equal(guided_prediction(model, x, t, y, cfg_scale=1.0), cond)
    # The batched pass runs other matmul shapes than two separate passes: equal up to float32
    # rounding, which is relative to the size of the values (~10 here).
    scale = cond.abs().max().item()
    for cfg_scale in [0.0, 1.5, 4.0]:
        batched = guided_prediction(model, x, t, y, cfg_scale)
        assert torch.allclose(batched, uncond + cfg_scale * (cond - uncond), rtol=1e-5, atol=1e-5 * scale * (1 + cfg_scale))
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    ddim_sample(model, get_noise_schedule("cosine"), torch.randn(3, 3, 8, 8), y, steps=3, cfg_scale=2.0)
    assert calls == [6, 6, 6]  # one batched cond+uncond pass per step
    # autoguidance: a guide network's class-less output replaces the model's own
    guide = randomize_(DiT(tiny_config(num_classes=4)), seed=1).eval()
    weak = guide(x, t, torch.full_like(y, 4))
    assert torch.equal(guided_prediction(model, x, t, y, 2.0, guide), weak + 2.0 * (cond - weak))
    assert torch.equal(guided_prediction(model, x, t, y, 2.0, model), uncond + 2.0 * (cond - uncond))  # its own: CFG

# --- a tiny model really learns ---------------------------------------------------

@pytest.mark.parametrize("name, prediction, optimizer", [("cosine", "eps", "adamw"), ("flow", "velocity", "adamw"),
                                                        ("flow", "velocity", "muon")])
def test_tiny_dit_learns_two_images(name, prediction, optimizer):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8).round() * 2 - 1  # two fixed, very different binary images
    model = DiT(tiny_config(n_embd=64, n_head=4, prediction=prediction))
    schedule = get_noise_schedule(name)
    optimizers = model.configure_optimizers(0.0, 2e-3, (0.9, 0.999), "cpu", optimizer)
    losses = []
    for step in range(300):
        y = torch.randint(0, 2, (32,))
        loss = diffusion_loss(model, schedule, images[y], y, class_dropout=0.1)
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-50:]) / 50 < 0.2  # one batch's loss is noisy: the mean of the last 50
    model.eval()
    y = torch.tensor([0, 1] * 4)
    for sampler in SAMPLERS:
        samples = sampler(model, schedule, torch.randn(8, 3, 8, 8), y, steps=20, cfg_scale=2.0, clip_x0=1.0)
        distance = ((samples[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4))  # (8 samples, 2 images)
        own = distance[torch.arange(8), y]
        other = distance[torch.arange(8), 1 - y]
        assert (own < other).all(), distance
        # the two images are ~2 apart; eps-prediction learns the high-noise end more slowly
        assert own.max() < (0.5 if prediction == "eps" else 0.05), (sampler.__name__, own)
