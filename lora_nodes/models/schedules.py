"""ComfyUI's sampler and scheduler names on diffusers' schedulers: sigmas by formula, set on the scheduler.

ComfyUI samples over a list of noise levels (sigmas, highest first, usually ending in 0) that a
*scheduler* computes from the model's trained noise levels, and a *sampler* steps along it.
Here the scheduler names become sigma lists by the formulas ComfyUI documents for them
(:func:`comfy_sigmas`), and each sampler name is a diffusers scheduler class of the family (its
``samplers`` table) that is then made to step along exactly those sigmas (:func:`install_sigmas`).

Two kinds of noise levels (:class:`NoiseLevels`):

- diffusion models (noise or v prediction): the sigmas ``sqrt((1 - a) / a)`` of the training
  schedule's cumulative alphas ``a``, one per training timestep; a timestep is the index of the
  nearest sigma (in log space), a fractional timestep interpolates log sigmas;
- flow-matching models: sigma is the shifted time ``t`` in 0..1, at ``count`` evenly spaced times.
  A schedule with resolution-dependent ("dynamic") shifting is shifted as ComfyUI shifts it when
  no ModelSamplingFlux node says otherwise: by its largest shift ``mu = max_shift``,
  ``exp(mu) / (exp(mu) + 1/t - 1)``, on 10000 times, the timestep being sigma itself; a fixed shift
  ``s`` gives ``s t / (1 + (s - 1) t)`` on 1000 times, the timestep being 1000 sigma.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the node declarations import this module, and must not import torch
    from torch import Tensor

# ComfyUI's sampler names, in its order: its files may carry any of them. Each family says which it
# draws with (Family.samplers); the others are refused, naming those it has (models.sampling.sampling_problem).
SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
# ComfyUI's scheduler names, in ComfyUI's order
SCHEDULER_NAMES: tuple[str, ...] = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                    "normal", "linear_quadratic", "kl_optimal")
DEFAULT_SCHEDULER = "default"  # Sample's choice of the base's own scheduler config (diffusers' schedule)
# ComfyUI computes one more step for these samplers and drops the second-to-last sigma
DISCARD_PENULTIMATE_SIGMA = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
# Classes that step only on the training timesteps (no sigmas of their own): along a sigma list they
# are replaced by the class ComfyUI's sampler of that name is (ComfyUI's ddim is deterministic Euler:
# DDIM with eta 0 is the Euler method on the same ODE)
SIGMA_EQUIVALENT = {"DDIMScheduler": "EulerDiscreteScheduler"}
# samplers that end at this sigma where the schedule ends at 0 (ComfyUI's UniPC stops there: its
# last step to 0 would divide by zero)
FINAL_SIGMA = {"uni_pc": 0.001, "uni_pc_bh2": 0.001}
KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6  # ComfyUI's beta scheduler's distribution


@dataclass(frozen=True)
class NoiseLevels:
    """The noise levels a model was trained at (ComfyUI's ``model_sampling``): ``sigmas`` ascending,
    one per training timestep, and how timesteps and sigmas map onto each other."""

    sigmas: Tensor  # float64, ascending
    timestep_of: Callable[[float], float]
    sigma_of: Callable[[float], float]
    flow: bool

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


def diffusion_levels(alphas_cumprod: Tensor) -> NoiseLevels:
    """The noise levels of a diffusion schedule given its cumulative alphas (one per timestep)."""
    sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()) ** 0.5
    log_sigmas = sigmas.log()

    def timestep_of(sigma: float) -> float:  # the nearest trained level, in log space
        return float((math.log(sigma) - log_sigmas).abs().argmin())

    def sigma_of(timestep: float) -> float:  # log-linear between trained levels
        t = min(max(float(timestep), 0.0), len(sigmas) - 1.0)
        low, high = math.floor(t), math.ceil(t)
        return math.exp((1 - (t - low)) * float(log_sigmas[low]) + (t - low) * float(log_sigmas[high]))

    return NoiseLevels(sigmas, timestep_of, sigma_of, flow=False)


def flow_shift(config: Mapping[str, Any]) -> Callable[[float], float]:
    """The time shift of a flow-matching schedule config (see the module docstring)."""
    if config.get("use_dynamic_shifting"):
        mu = float(config.get("max_shift", 1.15))
        return lambda t: math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0
    shift = float(config.get("shift", 1.0))
    return lambda t: shift * t / (1 + (shift - 1) * t)


def flow_levels(config: Mapping[str, Any]) -> NoiseLevels:
    """The noise levels of a flow-matching schedule config."""
    import torch

    shift = flow_shift(config)
    dynamic = bool(config.get("use_dynamic_shifting"))
    count, multiplier = (10000, 1.0) if dynamic else (1000, 1000.0)
    sigmas = torch.tensor([shift(i / count) for i in range(1, count + 1)], dtype=torch.float64)
    return NoiseLevels(sigmas, lambda sigma: sigma * multiplier, lambda t: shift(t / multiplier), flow=True)


def noise_levels(scheduler_config: Mapping[str, Any], flow: bool) -> NoiseLevels:
    """The noise levels of a base's scheduler config (a flow-matching one where ``flow``)."""
    if flow:
        return flow_levels(scheduler_config)
    import diffusers  # deferred: diffusers takes seconds to import

    # diffusers' betas (and zero-terminal-SNR rescaling) from the config: the same as ComfyUI's
    accepted = inspect.signature(diffusers.EulerDiscreteScheduler.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in accepted}
    return diffusion_levels(diffusers.EulerDiscreteScheduler(**config).alphas_cumprod)


# -- the schedulers: a number of steps -> sigmas (steps + 1 of them, the last 0) ----------------------

def _karras(levels: NoiseLevels, steps: int) -> list[float]:
    import torch

    low, high = levels.sigma_min ** (1 / KARRAS_RHO), levels.sigma_max ** (1 / KARRAS_RHO)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return [*((high + ramp * (low - high)) ** KARRAS_RHO).tolist(), 0.0]


def _exponential(levels: NoiseLevels, steps: int) -> list[float]:
    import torch

    logs = torch.linspace(math.log(levels.sigma_max), math.log(levels.sigma_min), steps, dtype=torch.float64)
    return [*logs.exp().tolist(), 0.0]


def _simple(levels: NoiseLevels, steps: int) -> list[float]:
    stride = len(levels.sigmas) / steps  # evenly spaced trained levels, from the highest
    return [float(levels.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def _normal(levels: NoiseLevels, steps: int, sgm: bool = False) -> list[float]:
    import torch

    start, end = levels.timestep_of(levels.sigma_max), levels.timestep_of(levels.sigma_min)
    if sgm:  # evenly spaced timesteps without the last, then 0
        times = torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]
        return [levels.sigma_of(float(t)) for t in times] + [0.0]
    if math.isclose(levels.sigma_of(end), 0, abs_tol=1e-5):  # the lowest level is 0 already
        return [levels.sigma_of(float(t)) for t in torch.linspace(start, end, steps + 1, dtype=torch.float64)]
    return [levels.sigma_of(float(t)) for t in torch.linspace(start, end, steps, dtype=torch.float64)] + [0.0]


def _sgm_uniform(levels: NoiseLevels, steps: int) -> list[float]:
    return _normal(levels, steps, sgm=True)


def _ddim_uniform(levels: NoiseLevels, steps: int) -> list[float]:
    # every k-th trained level from the second lowest up, k = levels // steps; then 0
    starts_at_zero = math.isclose(float(levels.sigmas[1]), 0, abs_tol=1e-5)
    stride = max(len(levels.sigmas) // (steps + 1 if starts_at_zero else steps), 1)
    chosen = [float(levels.sigmas[i]) for i in range(1, len(levels.sigmas), stride)]
    return (chosen if starts_at_zero else [0.0, *chosen])[::-1]


def _beta(levels: NoiseLevels, steps: int) -> list[float]:
    import torch
    from scipy.stats import beta  # deferred: only this scheduler needs scipy

    last = len(levels.sigmas) - 1
    quantiles = 1 - torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1].numpy()
    indices = [round(float(t)) for t in beta.ppf(quantiles, BETA_ALPHA, BETA_BETA) * last]
    # numpy's rint (round half to even) is Python's round; a repeated index is one level
    kept = [i for n, i in enumerate(indices) if n == 0 or i != indices[n - 1]]
    return [float(levels.sigmas[i]) for i in kept] + [0.0]


def _linear_quadratic(levels: NoiseLevels, steps: int, threshold: float = 0.025) -> list[float]:
    # Mochi's schedule: linear to ``threshold`` over the first half of the steps, then quadratic to 1
    if steps == 1:
        return [levels.sigma_max, 0.0]
    linear_steps = steps // 2
    linear = [i * threshold / linear_steps for i in range(linear_steps)]
    step_diff = linear_steps - threshold * steps
    quadratic_steps = steps - linear_steps
    a = step_diff / (linear_steps * quadratic_steps ** 2)
    b = threshold / linear_steps - 2 * step_diff / quadratic_steps ** 2
    c = a * linear_steps ** 2
    quadratic = [a * i ** 2 + b * i + c for i in range(linear_steps, steps)]
    return [(1.0 - x) * levels.sigma_max for x in [*linear, *quadratic, 1.0]]


def _kl_optimal(levels: NoiseLevels, steps: int) -> list[float]:
    import torch

    if steps == 1:
        return [levels.sigma_max, 0.0]
    w = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    angles = w * math.atan(levels.sigma_min) + (1 - w) * math.atan(levels.sigma_max)
    return [*angles.tan().tolist(), 0.0]


SCHEDULES: dict[str, Callable[[NoiseLevels, int], list[float]]] = {
    "simple": _simple, "sgm_uniform": _sgm_uniform, "karras": _karras, "exponential": _exponential,
    "ddim_uniform": _ddim_uniform, "beta": _beta, "normal": _normal, "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}
assert tuple(SCHEDULES) == SCHEDULER_NAMES


def scheduler_sigmas(levels: NoiseLevels, scheduler: str, steps: int) -> list[float]:
    """The sigmas ComfyUI's ``scheduler`` gives for ``steps`` steps on these noise levels (steps + 1 of
    them, highest first; the last is 0)."""
    return SCHEDULES[scheduler](levels, steps)


def comfy_sigmas(levels: NoiseLevels, scheduler: str, sampler: str, steps: int, denoise: float = 1.0) -> list[float]:
    """The sigmas ComfyUI's KSampler steps along: the scheduler's, with the sampler's adjustment
    (:data:`DISCARD_PENULTIMATE_SIGMA`), and for ``denoise`` < 1 the last ``steps`` steps of a
    schedule of ``int(steps / denoise)`` (empty when ``denoise`` is 0: nothing to do)."""
    def calculate(count: int) -> list[float]:
        if sampler in DISCARD_PENULTIMATE_SIGMA:
            sigmas = scheduler_sigmas(levels, scheduler, count + 1)
            return sigmas[:-2] + sigmas[-1:]
        return scheduler_sigmas(levels, scheduler, count)

    return denoised_tail(calculate, steps, denoise)


def denoised_tail(calculate: Callable[[int], list[float]], steps: int, denoise: float) -> list[float]:
    """ComfyUI's cut for ``denoise``: the whole schedule ``calculate(steps)`` at 1; below, the last
    ``steps`` steps of ``calculate(int(steps / denoise))``; nothing at 0."""
    if denoise > 0.9999:
        return calculate(steps)
    if denoise <= 0.0:
        return []
    return calculate(int(steps / denoise))[-(steps + 1):]


def cut_sigmas(sigmas: list[float], start_step: int = 0, end_step: int | None = None,
               leftover_noise: bool = False) -> list[float]:
    """KSamplerAdvanced's part of a schedule: from ``start_step`` to ``end_step``; the last sigma is set
    to 0 unless ``leftover_noise`` keeps the noise left there. Fewer than 2 sigmas: nothing to do."""
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[:end_step + 1]
        if not leftover_noise:
            sigmas = [*sigmas[:-1], 0.0]
    return sigmas[start_step:] if start_step < len(sigmas) - 1 else []


def sampler_final_sigma(sigmas: list[float], sampler: str) -> list[float]:
    """The sigmas a sampler steps along: a last 0 becomes the sampler's :data:`FINAL_SIGMA`, if it has one."""
    if sigmas and sigmas[-1] == 0 and sampler in FINAL_SIGMA:
        return [*sigmas[:-1], FINAL_SIGMA[sampler]]
    return sigmas


# -- sampler names -> diffusers schedulers stepping along given sigmas ---------------------------------

def sampler_class(family_samplers: Mapping[str, tuple[str, Mapping[str, Any]]], sampler: str,
                  along_sigmas: bool) -> tuple[str, dict[str, Any]]:
    """The diffusers class name and config changes of a family's sampler; along a sigma list, a class
    that cannot step along one is replaced by its :data:`SIGMA_EQUIVALENT`."""
    class_name, changes = family_samplers[sampler]
    if along_sigmas and class_name in SIGMA_EQUIVALENT:
        return SIGMA_EQUIVALENT[class_name], {}
    return class_name, dict(changes)


def make_scheduler(class_name: str, changes: Mapping[str, Any], base_config: Mapping[str, Any],
                   seed: int | None = None) -> Any:
    """A fresh diffusers scheduler of ``class_name`` on the base's noise schedule (``base_config``),
    with ``changes``; a scheduler that draws its own Brownian noise gets ``seed`` for it (else it
    would draw a different picture each run)."""
    import diffusers  # deferred: diffusers takes seconds to import

    scheduler_class = getattr(diffusers, class_name)
    # only what the class takes: another class's settings would be ignored anyway, with a warning
    accepted = inspect.signature(scheduler_class.__init__).parameters
    config = {k: v for k, v in base_config.items() if k in accepted or k.startswith("_")}
    extra = {"noise_sampler_seed": seed} if seed is not None and "noise_sampler_seed" in accepted else {}
    return scheduler_class.from_config(config, **{**changes, **extra})


def uses_karras_conversion(scheduler: Any) -> bool:
    """Whether the scheduler builds its steps from a sigma list it converts to Karras' (then it can be
    handed any list there, and builds its own timesteps and second-order steps from it)."""
    return "use_karras_sigmas" in scheduler.config and hasattr(scheduler, "_convert_to_karras")


def install_sigmas(scheduler: Any, sigmas: list[float], flow: bool) -> int:
    """Make ``scheduler`` step along ``sigmas`` (highest first; its steps are the pairs of neighbours).

    Returns how many steps to run: a list that ends above 0 (noise left for a later sampler) is
    installed with a 0 appended, and the caller stops one step early, so multistep and second-order
    samplers treat the last step as ComfyUI does (not as a final step to 0).

    Diffusion schedulers that convert their sigmas to Karras' are handed the list there (their own
    code then sets the timesteps, interleaves second-order steps and appends the final 0); the
    others, and every flow-matching scheduler, are set up for as many steps and given the sigmas and
    matching timesteps. Timesteps are the trained timestep of each sigma (fractional), or 1000 times
    the sigma for flow matching, as diffusers sets them.
    """
    import torch

    steps = len(sigmas) - 1
    body = sigmas[:-1] if sigmas[-1] == 0 else list(sigmas)
    if not flow and uses_karras_conversion(scheduler):
        import numpy as np

        scheduler.register_to_config(use_karras_sigmas=True, use_exponential_sigmas=False, use_beta_sigmas=False,
                                     final_sigmas_type="zero")
        scheduler._convert_to_karras = lambda in_sigmas, num_inference_steps=None: np.array(body, dtype=np.float64)
        try:
            scheduler.set_timesteps(len(body), device="cpu")
        finally:
            del scheduler._convert_to_karras
        return steps
    set_steps(scheduler, len(body))
    values = torch.tensor([*body, 0.0], dtype=torch.float32)
    if flow:
        timesteps = values[:-1] * scheduler.config.num_train_timesteps
    else:
        timesteps = fractional_timesteps(scheduler.alphas_cumprod, body)
    # fractional timesteps kept as they are (a class that rounds its own would only look them up)
    scheduler.sigmas, scheduler.timesteps = values, timesteps
    if hasattr(scheduler, "num_inference_steps"):
        scheduler.num_inference_steps = len(body)
    return steps


def fractional_timesteps(alphas_cumprod: Tensor, sigmas: list[float]) -> Tensor:
    """The (fractional) training timestep of each sigma: log sigma interpolated between the trained
    levels, as diffusers' schedulers place a sigma between timesteps."""
    import numpy as np
    import torch

    log_levels = (((1 - alphas_cumprod.double()) / alphas_cumprod.double()) ** 0.5).log().numpy()
    times = np.interp(np.log(np.asarray(sigmas, dtype=np.float64)), log_levels, np.arange(len(log_levels)))
    return torch.tensor(times, dtype=torch.float32)


def set_steps(scheduler: Any, count: int) -> None:
    """``set_timesteps(count)`` (which also resets the scheduler's state), with the shift a schedule
    with resolution-dependent shifting needs (any: the sigmas are replaced next)."""
    parameters = inspect.signature(scheduler.set_timesteps).parameters
    extra = {"mu": 1.0} if "mu" in parameters and scheduler.config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(count, device="cpu", **extra)
