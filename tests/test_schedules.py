"""ComfyUI's scheduler names give ComfyUI's sigmas: each against its formula written here, and against
diffusers' own schedules where diffusers has the same one; each sampler then steps along exactly them."""

import itertools
import math

import diffusers
import numpy as np
import pytest
from scipy.stats import beta as beta_distribution

from lora_nodes.families.flux import FLUX
from lora_nodes.families.sd1 import SD1
from lora_nodes.models import schedules
from lora_nodes.models.schedules import (
    SCHEDULER_NAMES,
    comfy_sigmas,
    cut_sigmas,
    noise_levels,
    scheduler_sigmas,
)

SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "prediction_type": "epsilon"}
FLUX_DEV = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def sd15_levels() -> np.ndarray:
    """SD1.5's trained noise levels: sigma = sqrt((1 - a) / a), a the cumulative product of 1 - beta,
    betas evenly spaced in square root from 0.00085 to 0.012."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    cumulative = np.cumprod(1 - betas)
    return np.sqrt((1 - cumulative) / cumulative)


def level_at(levels: np.ndarray, t: float) -> float:
    """A trained level at a fractional timestep: log sigma interpolated linearly."""
    return float(np.exp(np.interp(t, np.arange(len(levels)), np.log(levels))))


def formula(name: str, n: int) -> list[float]:
    """ComfyUI's schedulers on SD1.5's levels, from their definitions."""
    s = sd15_levels()
    low, high = s[0], s[-1]
    if name == "karras":  # rho = 7, evenly spaced in sigma^(1/7)
        return [(high ** (1 / 7) + i / (n - 1) * (low ** (1 / 7) - high ** (1 / 7))) ** 7 for i in range(n)] + [0]
    if name == "exponential":  # evenly spaced in log sigma
        return [math.exp(math.log(high) + i / (n - 1) * (math.log(low) - math.log(high))) for i in range(n)] + [0]
    if name == "simple":  # every (1000 / n)-th trained level from the top
        return [s[999 - int(i * 1000 / n)] for i in range(n)] + [0]
    if name == "normal":  # n timesteps evenly from 999 to 0
        return [level_at(s, 999 - i * 999 / (n - 1)) for i in range(n)] + [0]
    if name == "sgm_uniform":  # n + 1 timesteps evenly from 999 to 0, without the last
        return [level_at(s, 999 - i * 999 / n) for i in range(n)] + [0]
    if name == "ddim_uniform":  # timesteps 1, 1 + k, 1 + 2k ... (k = 1000 // n), highest first
        return [s[t] for t in range(1, 1000, 1000 // n)][::-1] + [0]
    if name == "beta":  # the Beta(0.6, 0.6) quantiles of 1 - i/n, as timesteps
        times = np.rint(beta_distribution.ppf(1 - np.arange(n) / n, 0.6, 0.6) * 999).astype(int)
        return [s[t] for i, t in enumerate(times) if i == 0 or t != times[i - 1]] + [0]
    if name == "linear_quadratic":  # Mochi's: 1 - x, x linear to 0.025 over half the steps, then quadratic to 1
        half = n // 2
        xs = [i * 0.025 / half for i in range(half)]
        a = (half - 0.025 * n) / (half * (n - half) ** 2)
        b = 0.025 / half - 2 * (half - 0.025 * n) / (n - half) ** 2
        xs += [a * i * i + b * i + a * half * half for i in range(half, n)] + [1.0]
        return [(1 - x) * high for x in xs]
    if name == "kl_optimal":  # evenly spaced in arctan(sigma)
        return [math.tan(i / (n - 1) * math.atan(low) + (1 - i / (n - 1)) * math.atan(high)) for i in range(n)] + [0]
    raise AssertionError(name)


def diffusers_sigmas(steps: int = 20, **config) -> np.ndarray:
    scheduler = diffusers.EulerDiscreteScheduler(**{**SD15, **config})
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [7, 20])
def test_every_scheduler_name_gives_its_formula(name, steps):
    ours = scheduler_sigmas(noise_levels(SD15, flow=False), name, steps)
    expected = formula(name, steps)
    assert ours == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert ours[-1] == 0 and all(a > b for a, b in itertools.pairwise(ours))  # from the most noise to none


@pytest.mark.parametrize(("name", "config", "tolerance"), [
    ("karras", {"use_karras_sigmas": True}, 1e-5),
    ("exponential", {"use_exponential_sigmas": True}, 1e-5),
    ("normal", {"timestep_spacing": "linspace"}, 5e-5),
    ("simple", {"timestep_spacing": "trailing"}, 1e-5),
])
def test_comfyui_names_match_the_diffusers_settings_of_the_same_schedule(name, config, tolerance):
    ours = np.array(scheduler_sigmas(noise_levels(SD15, flow=False), name, 20))
    assert np.abs(ours - diffusers_sigmas(**config)).max() < tolerance
    # diffusers' default for SD1.5 (leading timesteps) is another schedule: why the names are mapped
    assert np.abs(ours - diffusers_sigmas(timestep_spacing="leading")).max() > 1.0


def test_flow_simple_is_the_flow_pipelines_schedule_at_the_largest_shift():
    ours = scheduler_sigmas(noise_levels(FLUX_DEV, flow=True), "simple", 20)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=1.15)
    assert ours == pytest.approx(scheduler.sigmas.double().tolist(), abs=1e-5)
    # exp(mu) / (exp(mu) + 1/t - 1) at t = 1 - i/20
    assert ours[:-1] == pytest.approx([math.e ** 1.15 / (math.e ** 1.15 + 1 / (1 - i / 20) - 1) for i in range(20)],
                                      abs=1e-6)


def test_a_fixed_flow_shift_shifts_times_by_it():
    ours = scheduler_sigmas(noise_levels({"shift": 3.0}, flow=True), "simple", 10)
    assert ours[:-1] == pytest.approx([3 * t / (1 + 2 * t) for t in (1 - i / 10 for i in range(10))], abs=1e-6)


def test_denoise_runs_the_last_steps_of_a_longer_schedule():
    levels = noise_levels(SD15, flow=False)
    full = scheduler_sigmas(levels, "karras", int(10 / 0.6))
    assert comfy_sigmas(levels, "karras", "euler", 10, denoise=0.6) == full[-11:]
    assert comfy_sigmas(levels, "karras", "euler", 10, denoise=1.0) == scheduler_sigmas(levels, "karras", 10)
    assert comfy_sigmas(levels, "karras", "euler", 10, denoise=0.0) == []


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_ancestral", "uni_pc"])
def test_some_samplers_drop_the_second_to_last_sigma_of_one_step_more(sampler):
    levels = noise_levels(SD15, flow=False)
    longer = scheduler_sigmas(levels, "normal", 11)
    assert comfy_sigmas(levels, "normal", sampler, 10) == longer[:-2] + [0.0]


def test_advanced_steps_cut_the_schedule():
    sigmas = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert cut_sigmas(sigmas, 0, 3, leftover_noise=True) == [5.0, 4.0, 3.0, 2.0]
    assert cut_sigmas(sigmas, 0, 3, leftover_noise=False) == [5.0, 4.0, 3.0, 0.0]
    assert cut_sigmas(sigmas, 3, None) == [2.0, 1.0, 0.0]
    assert cut_sigmas(sigmas, 5, None) == []  # nothing left to do
    assert schedules.sampler_final_sigma([2.0, 0.0], "uni_pc") == [2.0, 0.001]


def scheduler_for(family, sampler, config, flow):
    class_name, changes = schedules.sampler_class(family.samplers, sampler, along_sigmas=True)
    return schedules.make_scheduler(class_name, changes, config, seed=0)


@pytest.mark.parametrize(("family", "sampler"), [(SD1, s) for s in SD1.samplers] + [(FLUX, s) for s in FLUX.samplers])
def test_every_sampler_steps_along_exactly_the_given_sigmas(family, sampler):
    flow = family.flow_matching
    config = FLUX_DEV if flow else SD15
    sigmas = scheduler_sigmas(noise_levels(config, flow), "karras", 6)
    scheduler = scheduler_for(family, sampler, config, flow)
    assert schedules.install_sigmas(scheduler, sigmas, flow) == 6
    held = scheduler.sigmas.double().tolist()
    distinct = [s for i, s in enumerate(held) if i == 0 or s != held[i - 1]]  # second-order: once per stage
    assert distinct == pytest.approx(sigmas, rel=1e-5, abs=1e-6)
    if flow:  # a flow model's timestep is 1000 sigma
        assert scheduler.timesteps.double().tolist() == pytest.approx([1000 * s for s in sigmas[:-1]], rel=1e-5)
    elif sampler not in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde"):  # (these add mid-step timesteps)
        s = sd15_levels()
        expected = [np.interp(math.log(x), np.log(s), np.arange(1000)) for x in sigmas[:-1]]
        assert scheduler.timesteps.double().tolist() == pytest.approx(expected, abs=0.51)  # some round them


def test_a_schedule_that_ends_above_zero_runs_one_step_fewer_than_it_installs():
    sigmas = [14.6, 5.0, 1.0]
    scheduler = scheduler_for(SD1, "dpmpp_2m", SD15, flow=False)
    assert schedules.install_sigmas(scheduler, sigmas, flow=False) == 2
    assert scheduler.sigmas.tolist() == pytest.approx([14.6, 5.0, 1.0, 0.0], rel=1e-6)


def test_ddim_steps_as_euler_along_sigmas_as_comfyui_runs_it():
    assert schedules.sampler_class(SD1.samplers, "ddim", along_sigmas=True)[0] == "EulerDiscreteScheduler"
    assert schedules.sampler_class(SD1.samplers, "ddim", along_sigmas=False)[0] == "DDIMScheduler"
    # the trained levels it steps along (ComfyUI's sigmas of the model): sqrt((1 - a) / a), one per timestep
    np.testing.assert_allclose(noise_levels(SD15, flow=False).sigmas.double().numpy(), sd15_levels(), rtol=1e-4)
