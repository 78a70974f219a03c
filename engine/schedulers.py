"""Samplers (schedulers) compiled to a per-step coefficient table.

Every supported update is one computation with different per-step scalars (m: the guided model
output, hist and hist2: the previous two steps' x0, z: noise):

    x0     = p*x + q*m                                   # eps-, v-, sample- and flow-prediction all have this form
    x0     = clamp(x0, -clip, clip)                      # only where clip_sample
    x_next = r*x0 + s*x + w*m + h*hist + h2*hist2 + u*z  # DDPM mean, DDIM, Euler, flow Euler, DPM-Solver++ (2M),
    hist2  = hist                                        #   UniPC (2M with its corrector folded in)
    hist   = x0

`w*m` carries DDIM's direction term when x0 is clipped: diffusers (and DDIM itself) point along the
*unclipped* noise estimate, which clipped x0 alone cannot express. With learned-range variance, u is
multiplied element-wise by exp(0.5*(logvar_min + (v+1)/2 * (logvar_max - logvar_min))).

The table is built once on the host in float64 and held on the device as float32, one row per step,
so `step` and the fused kernel read row i without syncing with the host, and a captured CUDA graph never
holds a stale Python number. Constructor arguments use diffusers' names and defaults.
"""
from __future__ import annotations

import inspect
import math
import numbers

import numpy as np
import torch

COLUMNS = ("p", "q", "clip", "r", "s", "w", "h", "u", "logvar_min", "logvar_max", "c_in", "c_in_next", "h2")
COL = {name: i for i, name in enumerate(COLUMNS)}
SPACINGS = ("linspace", "leading", "trailing")


def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule) -> np.ndarray:
    T = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
    raise ValueError(f"beta_schedule={beta_schedule!r}: expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")


def spaced_timesteps(spacing: str, T: int, n: int, steps_offset: int = 0, rounded: bool = True) -> np.ndarray:
    """diffusers' timestep spacings (Table 2 of arXiv:2305.08891), descending."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1]
        return ts.round() if rounded else ts
    if spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing={spacing!r}: expected one of {SPACINGS}")


def vp_prediction_coefs(prediction_type: str, alpha_bar: float):
    """(p, q) with x0 = p*x + q*m and (ex, em) with eps = ex*x + em*m, for a VP sample at alpha_bar."""
    a, b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (1 / a, -b / a), (0.0, 1.0)
    if prediction_type == "v_prediction":
        return (a, -b), (b, a)
    if prediction_type == "sample":
        return (0.0, 1.0), (1 / b, -a / b)
    raise ValueError(f"prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction' or 'sample'")


def check_number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a float, or a ValueError naming the argument when it is not a finite number in the range
    (a NaN or Inf argument would otherwise become a table of non-finite coefficients, and NaN samples)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}" \
                 f"{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}={value!r}: expected a finite number in {bounds}")
    return float(value)


class Scheduler:
    """Base: subclasses fill `_rows()`; this class holds the table and runs the reference step."""

    history_depth = 0  # how many past x0 the update reads: 1 for DPM-Solver++ (hist), 2 for UniPC (hist, hist2)
    learned_variance = False
    clip_sample = False
    continuous_time = False  # a flow schedule may take more steps than it has training timesteps

    def __init__(self, num_inference_steps: int, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        most = math.inf if self.continuous_time else num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= most:
            bound = ("a positive int" if self.continuous_time
                     else f"an int in [1, num_train_timesteps={num_train_timesteps}]")
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected {bound}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r}: expected one of {SPACINGS}")
        if beta_schedule in ("linear", "scaled_linear"):
            check_number("beta_start", beta_start, 0.0, 1.0, low_open=True, high_open=True)
            check_number("beta_end", beta_end, 0.0, 1.0, low_open=True, high_open=True)
            if beta_start > beta_end:
                raise ValueError(f"beta_start={beta_start!r} > beta_end={beta_end!r}: expected beta_start <= beta_end "
                                 "(noise grows along the forward process)")
        self.num_inference_steps = num_inference_steps
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        timesteps, rows, self.init_noise_sigma = self._rows()
        rows = np.asarray(rows, dtype=np.float64)
        rows[:-1, COL["c_in_next"]] = rows[1:, COL["c_in"]]
        rows[-1, COL["c_in_next"]] = 1.0
        bad = ~np.isfinite(rows)
        bad[:, COL["clip"]] = np.isnan(rows[:, COL["clip"]])  # +inf there means "no clipping"
        if bad.any():
            i, col = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"{type(self).__name__}: the arguments give a non-finite coefficient ({COLUMNS[col]} at "
                             f"step {i}); check them against the scheduler's documented ranges")
        self.table_f64 = rows
        self.needs_noise = [bool(u != 0) for u in rows[:, COL["u"]]]  # host-side: decides where noise is drawn
        self._timesteps = torch.tensor(np.array(timesteps, dtype=np.float64), dtype=torch.float32)
        self._table = torch.as_tensor(rows, dtype=torch.float32)
        self._history = self._history2 = None

    # -- the table -------------------------------------------------------------------------------------
    def _rows(self):
        raise NotImplementedError

    @staticmethod
    def _row(**values) -> list[float]:
        row = [0.0] * len(COLUMNS)
        row[COL["clip"]] = math.inf
        row[COL["c_in"]] = 1.0
        for name, value in values.items():
            row[COL[name]] = float(value)
        return row

    @property
    def timesteps(self) -> torch.Tensor:
        """(S,) float32 timesteps passed to the model, in sampling order."""
        return self._timesteps

    @property
    def table(self) -> torch.Tensor:
        """(S, len(COLUMNS)) float32 coefficient table, on the device of the last `to()`."""
        return self._table

    def to(self, device) -> "Scheduler":
        self._table = self._table.to(device)
        self._timesteps = self._timesteps.to(device)
        return self

    @property
    def uses_history(self) -> bool:
        return self.history_depth > 0

    def __len__(self):
        return self.num_inference_steps

    def __repr__(self):
        return (f"{type(self).__name__}(steps={self.num_inference_steps}, prediction_type={self.prediction_type!r}, "
                f"timestep_spacing={self.timestep_spacing!r})")

    # -- the reference step ----------------------------------------------------------------------------
    def reset(self):
        """Forget the multistep history (start of a new trajectory)."""
        self._history = self._history2 = None

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor | None = None):
        """Reference math for step i: returns x_next. Reads row i of the device table, never syncs.

        `model_output` is (B, C, ...) or (B, 2C, ...) with the learned-variance channels after the
        prediction; those are used by learned-range DDPM and ignored otherwise. `noise` is drawn with
        `torch.randn_like` when the step needs it and none is given.
        """
        if not 0 <= i < self.num_inference_steps:
            raise IndexError(f"step index i={i} out of range for {self.num_inference_steps} steps")
        C = x.shape[1]
        if model_output.shape[0] != x.shape[0] or model_output.shape[1] not in (C, 2 * C) \
                or model_output.shape[2:] != x.shape[2:]:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match x {tuple(x.shape)}: "
                             f"expected (B, C or 2C, ...)")
        if self._table.device != x.device:
            self.to(x.device)
        p, q, clip, r, s, w, h, u, lmin, lmax = self._table[i, :10].unbind()
        xf, m = x.float(), model_output[:, :C].float()
        x0 = p * xf + q * m
        if self.clip_sample:
            x0 = x0.clamp(-clip, clip)
        out = r * x0 + s * xf + w * m
        if self.history_depth:
            if self._history is not None:
                out = out + h * self._history
            if self.history_depth > 1:
                if self._history2 is not None:
                    out = out + self._table[i, COL["h2"]] * self._history2
                self._history2 = self._history
            self._history = x0
        if self.needs_noise[i]:
            z = torch.randn_like(xf) if noise is None else noise.float()
            if self.learned_variance:
                if model_output.shape[1] != 2 * C:
                    raise ValueError("learned_range variance needs the model's variance channels: "
                                     f"model_output has {model_output.shape[1]} channels, expected {2 * C}")
                frac = (model_output[:, C:].float() + 1) / 2
                u = u * torch.exp(0.5 * (lmin + frac * (lmax - lmin)))
            out = out + u * z
        return out.to(x.dtype)


class DDPM(Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020), as diffusers' `DDPMScheduler`.

    variance_type: fixed_small (posterior variance), fixed_large (beta_t), learned_range (DiT's: the
    model interpolates in log space between the two).
    """

    def __init__(self, num_inference_steps: int = 1000, *, variance_type: str = "fixed_small",
                 clip_sample: bool = True, clip_sample_range: float = 1.0, **kwargs):
        if variance_type not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"variance_type={variance_type!r}: expected 'fixed_small', 'fixed_large' or "
                             "'learned_range'")
        check_number("clip_sample_range", clip_sample_range, 0.0, low_open=True)
        self.variance_type, self.clip_sample, self.clip_sample_range = variance_type, clip_sample, clip_sample_range
        self.learned_variance = variance_type == "learned_range"
        super().__init__(num_inference_steps, **kwargs)

    def _rows(self):
        ts = spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, self.num_inference_steps,
                              self.steps_offset)
        rows = []
        for i, t in enumerate(ts.astype(np.int64)):
            prev = ts[i + 1].astype(np.int64) if i + 1 < len(ts) else -1
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[prev] if prev >= 0 else 1.0
            beta_t = 1 - a_t / a_prev
            (p, q), _ = vp_prediction_coefs(self.prediction_type, a_t)
            posterior_var = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
            noise = {}
            if t > 0:
                if self.variance_type == "fixed_small":
                    noise = dict(u=math.sqrt(posterior_var))
                elif self.variance_type == "fixed_large":
                    noise = dict(u=math.sqrt(beta_t))
                else:
                    noise = dict(u=1.0, logvar_min=math.log(posterior_var), logvar_max=math.log(beta_t))
            rows.append(self._row(p=p, q=q, clip=self.clip_sample_range if self.clip_sample else math.inf,
                                  r=math.sqrt(a_prev) * beta_t / (1 - a_t),
                                  s=math.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t), **noise))
        return ts, rows, 1.0


class DDIM(Scheduler):
    """DDIM (Song et al. 2021), as diffusers' `DDIMScheduler`, with `eta` for the stochastic variant.

    Clipping (`clip_sample=True`, diffusers' default) clamps the predicted x0 to [-clip_sample_range,
    clip_sample_range]. What the update then points along is `use_clipped_model_output`:

    - False (diffusers' default): the direction term uses the model's own, *unclipped* noise estimate, so
      clipped x0 and the noise it is combined with disagree. Guidance pushes the estimate far out, and the
      disagreement grows with cfg: the shipped digits model (50 steps, 200 samples) falls to 77% conditional
      accuracy at cfg 2 and 8.5% at cfg 4.
    - True (the DDIM paper's and facebookresearch/DiT's `ddim_sample`): the noise is re-derived from the
      clipped x0, eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t), so the step stays on the line through x and
      x0. The same model gives 100% at cfg 2 and cfg 4 (as does sampling without clipping).

    It equals diffusers' `DDIMScheduler.step(..., use_clipped_model_output=True)`; being part of the
    precomputed table, it is a constructor argument here, not a `step` argument.

    Unlike diffusers, the previous timestep is the next entry of `timesteps`, not `t - T // N`: the two
    agree for uniform spacings ("leading", and "trailing" when N divides T) and diffusers is wrong for the
    others ("linspace"), where it steps to timesteps the schedule never visits.
    """

    def __init__(self, num_inference_steps: int = 50, *, eta: float = 0.0, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 use_clipped_model_output: bool = False, **kwargs):
        check_number("eta", eta, 0.0)
        check_number("clip_sample_range", clip_sample_range, 0.0, low_open=True)
        self.eta, self.clip_sample, self.clip_sample_range = eta, clip_sample, clip_sample_range
        self.set_alpha_to_one = set_alpha_to_one
        self.use_clipped_model_output = use_clipped_model_output
        super().__init__(num_inference_steps, **kwargs)

    def _rows(self):
        ts = spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, self.num_inference_steps,
                              self.steps_offset)
        final_alpha = 1.0 if self.set_alpha_to_one else self.alphas_cumprod[0]
        rows = []
        for i, t in enumerate(ts.astype(np.int64)):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[int(ts[i + 1])] if i + 1 < len(ts) else final_alpha
            (p, q), (ex, em) = vp_prediction_coefs(self.prediction_type, a_t)
            std = self.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            direction = math.sqrt(max(1 - a_prev - std**2, 0.0))
            clip = self.clip_sample_range if self.clip_sample else math.inf
            if self.use_clipped_model_output:  # eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t) folds into r and s
                sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)
                rows.append(self._row(p=p, q=q, clip=clip, r=math.sqrt(a_prev) - direction * sa / sb,
                                      s=direction / sb, u=std))
            else:
                rows.append(self._row(p=p, q=q, clip=clip, r=math.sqrt(a_prev), s=direction * ex,
                                      w=direction * em, u=std))
        return ts, rows, 1.0


def _vp_sigmas(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Karras sigma = sqrt((1 - a)/a), linearly interpolated at (possibly fractional) timesteps."""
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


class Euler(Scheduler):
    """Euler ODE solver in sigma space (Karras et al. 2022), as diffusers' `EulerDiscreteScheduler`.

    The sample lives in sigma space (x = x_vp * sqrt(sigma^2 + 1)); the model sees x * c_in with
    c_in = 1 / sqrt(sigma^2 + 1), which the sampler applies from the table's `c_in` column.
    """

    def __init__(self, num_inference_steps: int = 50, *, timestep_spacing: str = "linspace", **kwargs):
        super().__init__(num_inference_steps, timestep_spacing=timestep_spacing, **kwargs)

    def _rows(self):
        ts = spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, self.num_inference_steps,
                              self.steps_offset, rounded=False)
        sigmas = np.append(_vp_sigmas(self.alphas_cumprod, ts), 0.0)
        rows = []
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            if self.prediction_type == "epsilon":
                p, q = 1.0, -sigma
            elif self.prediction_type == "v_prediction":
                p, q = 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
            elif self.prediction_type == "sample":
                p, q = 0.0, 1.0
            else:
                raise ValueError(f"prediction_type={self.prediction_type!r}: expected 'epsilon', "
                                 "'v_prediction' or 'sample'")
            ratio = sigma_next / sigma
            rows.append(self._row(p=p, q=q, r=1 - ratio, s=ratio, c_in=1 / math.sqrt(sigma**2 + 1)))
        top = sigmas.max()
        init_sigma = top if self.timestep_spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
        return ts, rows, float(init_sigma)


def _multistep_timesteps(spacing: str, T: int, n: int, steps_offset: int) -> np.ndarray:
    """The multistep solvers' VP timesteps (diffusers' DPM-Solver and UniPC): spacings of n + 1 points, the last
    dropped."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    if spacing == "leading":
        return (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    return np.arange(T, 0, -T / n).round() - 1


def _karras_sigmas(betas: np.ndarray, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                   rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, fractional training timesteps): Karras et al.'s n descending sigmas between the training schedule's
    extremes (or the given ones), and where they fall on it by log-sigma interpolation, as diffusers'
    `_convert_to_karras` and `_sigma_to_t` make them.

    The training sigmas are diffusers' float32 ones: 1 - alpha_bar cancels at t = 0, which moves sigma_min by ~1e-4
    there, and every Karras sigma (and the timesteps they round to) with it."""
    alphas_cumprod = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0)
    train = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).double().numpy()
    lo = train[0] if sigma_min is None else sigma_min
    hi = train[-1] if sigma_max is None else sigma_max
    ramp = np.linspace(0, 1, n)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return sigmas, np.interp(np.log(sigmas), np.log(train), np.arange(len(train)))


def _alpha_sigma(sigmas: np.ndarray, flow: bool) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) of the sample x_t = alpha_t x0 + sigma_t noise at each sigma: the rectified flow's
    (1 - sigma, sigma), or the VP schedule's from its Karras sigma."""
    if flow:
        return 1 - sigmas, sigmas
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    return alpha, sigmas * alpha


def _data_prediction(prediction_type: str, alpha: float, sigma_t: float) -> tuple[float, float]:
    """(p, q) with x0 = p*x + q*m for the multistep solvers' parameterisations (flow: the model predicts
    noise - x0, so x0 = x - sigma v)."""
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma_t / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma_t
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "flow_prediction":
        return 1.0, -sigma_t
    raise ValueError(f"prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction', 'sample' or "
                     "'flow_prediction'")


class DPMSolverPP(Scheduler):
    """DPM-Solver++ multistep (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler` with
    `algorithm_type="dpmsolver++"`, `solver_type="midpoint"`: 2M with first-order first and final steps
    (`lower_order_final`, and always when the final sigma is zero).

    `use_flow_sigmas` (Wan's choice, with `prediction_type="flow_prediction"`): the rectified-flow schedule,
    x_t = (1 - sigma) x0 + sigma noise, its sigmas those of `linspace(1, 1/T, n + 1)` shifted by `flow_shift`
    (`mu` sets `flow_shift = e^mu`, diffusers' dynamic shift) and the model's timesteps `int(sigma T)`, as diffusers'
    `set_timesteps` makes them; the solver is the same in (alpha_t, sigma_t) = (1 - sigma, sigma).

    `use_karras_sigmas` (VP only): Karras et al.'s sigma spacing (rho = 7) instead of the timestep spacing."""

    history_depth = 1

    def __init__(self, num_inference_steps: int = 20, *, solver_order: int = 2, lower_order_final: bool = True,
                 final_sigmas_type: str = "zero", timestep_spacing: str = "linspace", use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, mu: float | None = None, use_karras_sigmas: bool = False, **kwargs):
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order={solver_order}: expected 1 or 2")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final_sigmas_type!r}: expected 'zero' or 'sigma_min'")
        if use_flow_sigmas and final_sigmas_type != "zero":
            raise ValueError("final_sigmas_type: flow sigmas end at 'zero' (a VP sigma_min means nothing there)")
        if use_flow_sigmas and use_karras_sigmas:
            raise ValueError("use_karras_sigmas: DPM-Solver++'s Karras sigmas are VP sigmas, not flow sigmas")
        if kwargs.get("prediction_type") == "flow_prediction" and not use_flow_sigmas:
            raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True")
        self.solver_order, self.lower_order_final = solver_order, lower_order_final
        self.final_sigmas_type = final_sigmas_type
        self.use_flow_sigmas, self.use_karras_sigmas = use_flow_sigmas, use_karras_sigmas
        # diffusers truncates the Karras timesteps of the cosine schedule instead of rounding them
        self._round_karras = kwargs.get("beta_schedule") != "squaredcos_cap_v2"
        self.flow_shift = math.exp(check_number("mu", mu)) if mu is not None else \
            check_number("flow_shift", flow_shift, 0.0, low_open=True)
        super().__init__(num_inference_steps, timestep_spacing=timestep_spacing, **kwargs)

    def _flow_sigmas(self) -> tuple[np.ndarray, np.ndarray]:
        """(model timesteps, sigmas) of the flow schedule, computed as diffusers does (same float64 operations, so
        that the integer timesteps truncate alike)."""
        T, n, shift = self.num_train_timesteps, self.num_inference_steps, self.flow_shift
        sigmas = 1.0 - np.linspace(1, 1 / T, n + 1)
        sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
        return (sigmas * T).astype(np.int64).astype(np.float64), sigmas

    def _rows(self):
        if self.use_flow_sigmas:
            ts, sigmas = self._flow_sigmas()
            sigmas = np.append(sigmas, 0.0)
        else:
            if self.use_karras_sigmas:
                sigmas, ts = _karras_sigmas(self.betas, self.num_inference_steps)
                ts = ts.round() if self._round_karras else np.floor(ts)
            else:
                ts = _multistep_timesteps(self.timestep_spacing, self.num_train_timesteps, self.num_inference_steps,
                                          self.steps_offset)
                sigmas = _vp_sigmas(self.alphas_cumprod, ts)
            last = (0.0 if self.final_sigmas_type == "zero"
                    else math.sqrt((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]))
            sigmas = np.append(sigmas, last)
        alpha, sigma_t = _alpha_sigma(sigmas, self.use_flow_sigmas)
        n = len(ts)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_t)
        rows = []
        for i in range(n):
            p, q = _data_prediction(self.prediction_type, alpha[i], sigma_t[i])
            if sigmas[i + 1] == 0:  # exp(-h) = 0: the update lands on x0
                rows.append(self._row(p=p, q=q, r=1.0))
                continue
            lower_final = i == n - 1 and (self.lower_order_final and n < 15 or self.final_sigmas_type == "zero")
            h = lam[i + 1] - lam[i]
            phi = -alpha[i + 1] * np.expm1(-h)  # -alpha_t (exp(-h) - 1)
            s = sigma_t[i + 1] / sigma_t[i]
            if self.solver_order == 1 or i == 0 or lower_final:
                rows.append(self._row(p=p, q=q, r=phi, s=s))
            else:
                half_over_r0 = 0.5 * h / (lam[i] - lam[i - 1])
                rows.append(self._row(p=p, q=q, r=phi * (1 + half_over_r0), s=s, h=-phi * half_over_r0))
        return ts, rows, 1.0


class UniPC(Scheduler):
    """UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler` with `predict_x0=True`: the UniP predictor
    of order `solver_order` (1 or 2; first order on the first step, and on the last with `lower_order_final`), and
    after every model evaluation but the first the UniC corrector, which refines the sample the model was just
    evaluated at with that evaluation before the predictor steps on from it. `solver_type` picks B(h): "bh1" -h,
    "bh2" e^-h - 1. `disable_corrector` lists the steps whose predicted sample the next step does not correct.

    The table has no column for the corrected sample: the corrector maps the previous corrected sample x^c_{i-1}
    to x^c_i = (sigma_i / sigma_{i-1}) x^c_{i-1} + C_i and the predictor that made x_i had the same first term,
    x_i = (sigma_i / sigma_{i-1}) x^c_{i-1} + P_{i-1}, so x^c_i = x_i + C_i - P_{i-1}, where C_i and P_{i-1} are
    combinations of x0_i, x0_{i-1}, x0_{i-2} alone. Each step is then
    x_{i+1} = r x0_i + s x_i + h x0_{i-1} + h2 x0_{i-2}: two x0 histories (`history_depth = 2`).

    The schedules are diffusers' (the VP timestep spacings, `use_karras_sigmas`, and `use_flow_sigmas` with
    `flow_shift`, or `mu` as in `DPMSolverPP`), their sigmas rounded to float32 as diffusers holds them: the first
    flow sigma is 1 - 1e-6, and float32 moves its alpha = 1 - sigma by 1.3%, which the first corrector and the
    second predictor read through log(alpha).

    Where diffusers' update is not finite this one takes its limit. A zero final sigma (final_sigmas_type="zero")
    makes diffusers' B(h) infinite under "bh1" and its second-order ratio r_1 zero: its last step returns NaN with
    "bh1", and with `lower_order_final=False` under either solver type. Here that step is first order and lands on
    x0, as DPM-Solver++'s does.
    """

    history_depth = 2

    def __init__(self, num_inference_steps: int = 20, *, solver_order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector=(), final_sigmas_type: str = "zero",
                 timestep_spacing: str = "linspace", use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 use_karras_sigmas: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential", mu: float | None = None,
                 predict_x0: bool = True, solver_p=None, **kwargs):
        if isinstance(solver_order, bool) or solver_order not in (1, 2):
            raise ValueError(f"solver_order={solver_order!r}: expected 1 or 2 (order 3 would need a third x0 "
                             "history)")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type={solver_type!r}: expected 'bh1' or 'bh2'")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final_sigmas_type!r}: expected 'zero' or 'sigma_min'")
        if predict_x0 is not True:
            raise ValueError(f"predict_x0={predict_x0!r}: only UniPC's data-prediction form (predict_x0=True) is "
                             "supported")
        if solver_p is not None:
            raise ValueError("solver_p: another scheduler as the predictor is not supported")
        if kwargs.get("prediction_type") == "flow_prediction" and not use_flow_sigmas:
            raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type={time_shift_type!r}: expected 'exponential' or 'linear'")
        if use_dynamic_shifting and mu is None:
            raise ValueError("mu: required with use_dynamic_shifting (diffusers' set_timesteps(mu=...))")
        if not isinstance(disable_corrector, (list, tuple, set, frozenset)) or not all(
                isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in disable_corrector):
            raise ValueError(f"disable_corrector={disable_corrector!r}: expected a list of step indices")
        self.solver_order, self.solver_type, self.lower_order_final = solver_order, solver_type, lower_order_final
        self.disable_corrector = frozenset(int(k) for k in disable_corrector)
        self.final_sigmas_type = final_sigmas_type
        self.use_flow_sigmas, self.use_karras_sigmas = use_flow_sigmas, use_karras_sigmas
        self.sigma_min = None if sigma_min is None else check_number("sigma_min", sigma_min, 0.0, low_open=True)
        self.sigma_max = None if sigma_max is None else check_number("sigma_max", sigma_max, 0.0, low_open=True)
        if mu is None:
            self.flow_shift = check_number("flow_shift", flow_shift, 0.0, low_open=True)
        elif time_shift_type == "exponential":  # e^mu / (e^mu + 1/sigma - 1): the static shift by e^mu
            self.flow_shift = math.exp(check_number("mu", mu))
        else:
            self.flow_shift = check_number("mu", mu, 0.0, low_open=True)
        super().__init__(num_inference_steps, timestep_spacing=timestep_spacing, **kwargs)

    def _schedule(self) -> tuple[np.ndarray, np.ndarray]:
        """(model timesteps, the n + 1 sigmas, the final one last), as diffusers' `set_timesteps` makes them."""
        T, n = self.num_train_timesteps, self.num_inference_steps
        if self.use_karras_sigmas:
            sigmas, ts = _karras_sigmas(self.betas, n, self.sigma_min, self.sigma_max)
            if self.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                ts = np.floor(sigmas * T)  # diffusers' int64 cast truncates
            else:
                ts = ts.round()
            last = sigmas[-1]
        elif self.use_flow_sigmas:
            sigmas = np.linspace(1, 1 / T, n + 1)[:-1]
            sigmas = self.flow_shift * sigmas / (1 + (self.flow_shift - 1) * sigmas)
            if abs(sigmas[0] - 1) < 1e-6:  # diffusers keeps alpha = 1 - sigma off zero (its log)
                sigmas[0] -= 1e-6
            ts = np.floor(sigmas * T)
            last = sigmas[-1]
        else:
            ts = _multistep_timesteps(self.timestep_spacing, T, n, self.steps_offset)
            sigmas = _vp_sigmas(self.alphas_cumprod, ts)
            last = math.sqrt((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0])
        last = last if self.final_sigmas_type == "sigma_min" else 0.0
        return ts, np.append(sigmas, last).astype(np.float32).astype(np.float64)

    def _phi_b(self, h: float) -> tuple[float, float]:
        """diffusers' h phi_1 = e^-h - 1 and B(h), of the data-prediction form's -h."""
        return np.expm1(-h), -h if self.solver_type == "bh1" else np.expm1(-h)

    def _predictor(self, lam, alpha, i: int, order: int) -> np.ndarray:
        """UniP from step i to i + 1 less its (sigma_{i+1} / sigma_i) x^c_i term, over (x0_i, x0_{i-1}, x0_{i-2})."""
        h = lam[i + 1] - lam[i]
        phi, b = self._phi_b(h)
        out = np.array([-alpha[i + 1] * phi, 0.0, 0.0])
        if order == 2:  # rho = 1/2 on D1 = (x0_{i-1} - x0_i) / r1, r1 = (lam_{i-1} - lam_i) / h: finite at h = 0
            out += -alpha[i + 1] * b * 0.5 * h / (lam[i - 1] - lam[i]) * np.array([-1.0, 1.0, 0.0])
        return out

    def _corrector(self, lam, alpha, i: int, order: int) -> np.ndarray:
        """UniC of the sample at step i (`order`: the last predictor's) less its (sigma_i / sigma_{i-1}) x^c_{i-1}
        term, over (x0_i, x0_{i-1}, x0_{i-2})."""
        h = lam[i] - lam[i - 1]
        phi, b = self._phi_b(h)
        out = np.array([0.0, -alpha[i] * phi, 0.0])
        if order == 1:
            rho_t = 0.5
        else:  # rhos = R^-1 b: R's rows the powers 0 and 1 of (r1, 1), b by diffusers' phi_k recursion
            r1 = (lam[i - 2] - lam[i - 1]) / h
            phi_k = phi / -h - 1
            b1 = phi_k / b
            b2 = 2 * (phi_k / -h - 0.5) / b
            rho_1, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array([b1, b2]))
            out += -alpha[i] * b * rho_1 / r1 * np.array([0.0, -1.0, 1.0])  # D1 = (x0_{i-2} - x0_{i-1}) / r1
        return out - alpha[i] * b * rho_t * np.array([1.0, -1.0, 0.0])  # D1_t = x0_i - x0_{i-1}

    def _rows(self):
        ts, sigmas = self._schedule()
        alpha, sigma_t = _alpha_sigma(sigmas, self.use_flow_sigmas)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_t)
        n = len(ts)
        rows, pred, order = [], np.zeros(3), 1
        for i in range(n):
            p, q = _data_prediction(self.prediction_type, alpha[i], sigma_t[i])
            # x^c_i - x_i = C_i - P_{i-1}; P_{i-1} was over (x0_{i-1}, x0_{i-2}, x0_{i-3}) and never reads x0_{i-3}
            correction = np.zeros(3)
            if i > 0 and i - 1 not in self.disable_corrector:
                correction = self._corrector(lam, alpha, i, order) - np.array([0.0, pred[0], pred[1]])
            order = min(self.solver_order, n - i if self.lower_order_final else n, i + 1)
            if sigmas[i + 1] == 0:
                order = 1
            ratio = sigma_t[i + 1] / sigma_t[i]
            pred = self._predictor(lam, alpha, i, order)
            r, h, h2 = ratio * correction + pred
            rows.append(self._row(p=p, q=q, r=r, s=ratio, h=h, h2=h2))
        return ts, rows, 1.0


class FlowMatchEuler(Scheduler):
    """Euler for rectified-flow models (x_t = (1 - sigma) x0 + sigma * noise, the model predicts
    noise - x0), as diffusers' `FlowMatchEulerDiscreteScheduler` with a static `shift`.

    `sigmas`: an explicit grid, as `set_timesteps(sigmas=...)` takes it (ACE-Step passes its own shifted
    grid, with `num_train_timesteps=1, shift=1`; Flux passes linspace(1, 1/n, n)): shifted like diffusers
    does, then the model timesteps are sigma * num_train_timesteps and the last step goes to 0.

    `use_dynamic_shifting` (Flux's resolution-dependent shift): the grid is shifted by `mu` instead of `shift`,
    `e^mu / (e^mu + 1/sigma - 1)` (`time_shift_type="exponential"`) or `mu / (mu + 1/sigma - 1)` ("linear"),
    as diffusers' `set_timesteps(mu=...)`; the pipeline computes mu from the image's token count.

    `begin_index`: only the steps of the full grid from this index on, as diffusers' `set_begin_index` (img2img's
    `strength`: the loop starts from the image's latents noised to that step's sigma)."""

    continuous_time = True

    def __init__(self, num_inference_steps: int | None = None, *, num_train_timesteps: int = 1000, shift: float = 1.0,
                 prediction_type: str = "flow", sigmas=None, use_dynamic_shifting: bool = False,
                 mu: float | None = None, time_shift_type: str = "exponential", begin_index: int = 0):
        if prediction_type != "flow":
            raise ValueError(f"prediction_type={prediction_type!r}: FlowMatchEuler expects 'flow'")
        self.shift = check_number("shift", shift, 0.0, low_open=True)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type={time_shift_type!r}: expected 'exponential' or 'linear'")
        if use_dynamic_shifting and mu is None:
            raise ValueError("mu: required with use_dynamic_shifting (the resolution-dependent shift, which the "
                             "pipeline computes from the image's token count)")
        self.mu = None if not use_dynamic_shifting else check_number("mu", mu, 0.0 if time_shift_type == "linear"
                                                                      else None, low_open=True)
        self.time_shift_type = time_shift_type
        self.sigmas = None
        if sigmas is not None:
            grid = np.asarray(sigmas, dtype=np.float64).reshape(-1)
            if grid.size == 0 or not np.all(np.isfinite(grid)) or grid.min() <= 0 or grid.max() > 1:
                raise ValueError(f"sigmas: expected a non-empty list of noise levels in (0, 1], got {list(sigmas)!r}")
            if num_inference_steps not in (None, grid.size):
                raise ValueError(f"num_inference_steps={num_inference_steps}: sigmas gives {grid.size} steps")
            self.sigmas, num_inference_steps = grid, grid.size
        elif num_inference_steps is None:
            num_inference_steps = 50
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or \
                not 0 <= begin_index < num_inference_steps:
            raise ValueError(f"begin_index={begin_index!r}: expected an int in [0, {num_inference_steps})")
        if begin_index:  # the shift is per sigma: shifting the tail of the grid gives the tail of the shifted grid
            grid = self.sigmas if self.sigmas is not None else self._grid(num_inference_steps, num_train_timesteps)
            self.sigmas, num_inference_steps = grid[begin_index:], num_inference_steps - begin_index
        super().__init__(num_inference_steps, num_train_timesteps=num_train_timesteps, prediction_type="flow")

    def _shifted(self, s):
        if self.mu is None:
            return self.shift * s / (1 + (self.shift - 1) * s)
        scale = math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
        return scale / (scale + (1 / s - 1))

    def _grid(self, n: int, T: int) -> np.ndarray:
        """The n-step inference grid before the shift: diffusers shifts the training sigmas (statically), then
        spans them with the grid."""
        sigma_max, sigma_min = (1.0, 1.0 / T) if self.mu is not None else (self._shifted(1.0), self._shifted(1.0 / T))
        return np.linspace(sigma_max * T, sigma_min * T, n) / T

    def _rows(self):
        T, n = self.num_train_timesteps, self.num_inference_steps
        sigmas = self._shifted(self.sigmas if self.sigmas is not None else self._grid(n, T))
        rows = []
        for sigma, sigma_next in zip(sigmas, np.append(sigmas[1:], 0.0)):
            ratio = sigma_next / sigma
            rows.append(self._row(p=1.0, q=-sigma, r=1 - ratio, s=ratio))
        return sigmas * T, rows, 1.0


_FROM_DIFFUSERS = {
    "DDPMScheduler": DDPM,
    "DDIMScheduler": DDIM,
    "EulerDiscreteScheduler": Euler,
    "DPMSolverMultistepScheduler": DPMSolverPP,
    "UniPCMultistepScheduler": UniPC,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEuler,
}

# diffusers options whose non-default values change the math in ways not covered here (unless the ditengine class
# takes the option: it then checks the value itself).
_UNSUPPORTED = {
    "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "invert_sigmas": False,
    "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "euler_at_final": False,
    "interpolation_type": "linear", "timestep_type": "discrete", "stochastic_sampling": False,
    "rescale_betas_zero_snr": False, "trained_betas": None, "shift_terminal": None,
}


def from_diffusers(scheduler, num_inference_steps: int = 50, **overrides) -> Scheduler:
    """Build the equivalent ditengine scheduler from a diffusers scheduler (or its class name and config).

    Options of the diffusers config that this engine does not implement raise a ValueError rather than
    being silently dropped; `overrides` replace config values (e.g. `eta=0.5` for DDIM).
    """
    name = type(scheduler).__name__
    if name not in _FROM_DIFFUSERS:
        raise ValueError(f"unsupported diffusers scheduler {name}; supported: {', '.join(_FROM_DIFFUSERS)}")
    cls = _FROM_DIFFUSERS[name]
    config = dict(scheduler.config)
    own = set(inspect.signature(cls.__init__).parameters)
    for key, default in _UNSUPPORTED.items():
        value = overrides.get(key, config.get(key, default))
        if key in config and key not in own and value != default:
            raise ValueError(f"{name} with {key}={value!r} is not supported (expected {default!r})")
    if cls is Euler and config.get("final_sigmas_type", "zero") != "zero":
        raise ValueError(f"{name} with final_sigmas_type={config['final_sigmas_type']!r} is not supported")
    accepted = set(own)
    if cls is not FlowMatchEuler:  # the others pass the common arguments on to Scheduler
        accepted |= set(inspect.signature(Scheduler.__init__).parameters)
    kwargs = {k: v for k, v in config.items() if k in accepted and k not in ("self", "num_inference_steps")}
    kwargs.update(overrides)
    return cls(num_inference_steps, **kwargs)
