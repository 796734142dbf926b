"""Averaging profiles chosen after the fact: the weight of each snapshot from where it was
saved, whatever the spacing of the saves.

Positions t_1 < ... < t_N are the inputs' steps when every input has one, else their
epochs. Input i stands for the interval (t_i - D_i, t_i], D_i = t_i - t_{i-1}, D_1 = D_2;
T = t_N. Its weight is a profile's kernel k(t) integrated over that interval (in closed
form), normalised to sum 1, so a run saved every 100 steps and one saved every 1000 get the
same average profile, and unequal saves count by the time they stand for.

    ema:halflife=H            k(t) = 2^(-(T - t) / H)            (H in the positions' unit)
    ema:decay=D,per=P         the same, with H = P ln 2 / -ln D  (decay D every P units)
    power:sigma_rel=S         k(t) = t^g on t >= 0, g solving S = sqrt((g+1)/((g+2)^2 (g+3)))
    power:gamma=G             the same with g given (EDM2's power-function EMA)
    wsm:linear|minus-sqrt|cosine   WSM merge weights emulating a decay f over the window:
                              w_i ~ f(x_{i-1}) - f(x_i), x_i = (t_i - t_0)/(T - t_0),
                              t_0 = t_1 - D_1, x_0 = 0; f = 1-x, 1-sqrt(x), (1+cos pi x)/2
    time                      w_i ~ D_i
    uniform                   w_i = 1/N

References: EDM2 (Karras et al. 2024, "Analyzing and improving the training dynamics of
diffusion models") for the power EMA and sigma_rel; WSM (Tian et al. 2025) for merge
weights that emulate a learning-rate decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckptavg.errors import OptionError

NAMES = ("uniform", "time", "ema", "power", "wsm")
WSM_DECAYS = ("linear", "minus-sqrt", "cosine")


@dataclass(frozen=True)
class Profile:
    """A parsed `--profile` spec: its name and parameters (`ema`: halflife; `power`: gamma;
    `wsm`: decay), and the spec as given (recorded in the output's metadata)."""

    name: str
    spec: str
    halflife: float | None = None
    gamma: float | None = None
    decay: str | None = None


def _fail(spec: str, why: str) -> OptionError:
    return OptionError("profile", why, repr(spec))


def _number(spec: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _fail(spec, f"{key}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise _fail(spec, f"{key} must be finite")
    return value


def parse(spec: str) -> Profile:
    """A Profile from its spec (see the module docstring); OptionError naming `profile`
    for a spec that does not parse, an unknown name, or a parameter out of range."""
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in NAMES:
        import difflib

        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise _fail(spec, f"unknown profile {name!r}; {hint}use one of uniform, time, "
                    "ema:halflife=H, ema:decay=D,per=P, power:sigma_rel=S, power:gamma=G, "
                    "wsm:linear, wsm:minus-sqrt, wsm:cosine")
    if name in ("uniform", "time"):
        if rest.strip():
            raise _fail(spec, f"{name} takes no parameters")
        return Profile(name, text)
    if name == "wsm":
        decay = rest.strip().lower()
        if decay not in WSM_DECAYS:
            raise _fail(spec, f"wsm needs a decay: wsm:{', wsm:'.join(WSM_DECAYS)}")
        return Profile(name, text, decay=decay)
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise _fail(spec, f"{part!r} is not KEY=VALUE")
        params[key.strip().lower()] = value.strip()
    if name == "ema":
        if set(params) == {"halflife"}:
            h = _number(spec, "halflife", params["halflife"])
        elif set(params) == {"decay", "per"}:
            d = _number(spec, "decay", params["decay"])
            per = _number(spec, "per", params["per"])
            if not 0 < d < 1 or per <= 0:
                raise _fail(spec, "decay must be in (0, 1) and per more than 0")
            h = per * math.log(2) / -math.log(d)
        else:
            raise _fail(spec, "ema takes halflife=H, or decay=D,per=P")
        if h <= 0:
            raise _fail(spec, "the half-life must be more than 0")
        return Profile(name, text, halflife=h)
    if set(params) == {"gamma"}:
        g = _number(spec, "gamma", params["gamma"])
    elif set(params) == {"sigma_rel"}:
        s = _number(spec, "sigma_rel", params["sigma_rel"])
        if not 0 < s < 12 ** -0.5:  # sigma_rel -> 1/sqrt(12) as gamma -> -1
            raise _fail(spec, "sigma_rel must be in (0, 0.2887)")
        g = sigma_rel_to_gamma(s)
    else:
        raise _fail(spec, "power takes sigma_rel=S or gamma=G")
    if g <= -1:
        raise _fail(spec, "gamma must be more than -1")
    return Profile(name, text, gamma=g)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of EDM2's power EMA with this relative standard deviation: the root of
    g^3 + 7 g^2 + (16 - t) g + (12 - t) = 0, t = sigma_rel^-2, above -1 (by bisection: the
    relation is monotone there)."""
    def sigma(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    lo, hi = -1.0 + 1e-12, 1.0
    while sigma(hi) > sigma_rel:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sigma(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def split_specs(text: str) -> list[str]:
    """`ema:decay=0.9,per=100,power:sigma_rel=0.1,wsm:linear` -> three specs: a comma starts
    a new spec only where a profile name follows."""
    specs: list[str] = []
    for part in text.split(","):
        head = part.strip().split(":", 1)[0].lower()
        if head in NAMES or not specs:
            specs.append(part.strip())
        else:
            specs[-1] += "," + part.strip()
    return [s for s in specs if s]


def weights(profile: Profile, positions: Sequence[float]) -> list[float]:
    """Each input's weight (summing to 1) under `profile`, for positions in increasing
    order."""
    n = len(positions)
    if n == 0:
        return []
    if profile.name == "uniform" or n == 1:
        return [1.0 / n] * n
    t = [float(x) for x in positions]
    if any(b <= a for a, b in zip(t, t[1:])):
        raise _fail(profile.spec, "the inputs' positions must increase strictly (two inputs "
                    "saved at the same step or epoch)")
    gaps = [t[1] - t[0]] + [b - a for a, b in zip(t, t[1:])]
    starts = [ti - d for ti, d in zip(t, gaps)]
    T = t[-1]
    if profile.name == "time":
        raw = gaps
    elif profile.name == "ema":
        h = profile.halflife

        def cdf(x: float) -> float:  # integral of 2^(-(T - u)/h) du, up to x
            return h / math.log(2) * 2.0 ** (-(T - x) / h)

        raw = [cdf(b) - cdf(a) for a, b in zip(starts, t)]
    elif profile.name == "power":
        g = profile.gamma  # t^g is integrable from 0 for g > -1; before 0 it is 0
        raw = [(b ** (g + 1) - max(a, 0.0) ** (g + 1)) / (g + 1) if b > 0 else 0.0
               for a, b in zip(starts, t)]
    else:  # wsm
        t0 = starts[0]
        f = {"linear": lambda x: 1 - x, "minus-sqrt": lambda x: 1 - math.sqrt(x),
             "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2}[profile.decay]
        xs = [0.0] + [(ti - t0) / (T - t0) for ti in t]
        raw = [f(a) - f(b) for a, b in zip(xs, xs[1:])]
    total = math.fsum(raw)
    if not total > 0 or not math.isfinite(total):
        raise _fail(profile.spec, "gives no weight to these inputs (check their positions)")
    return [x / total for x in raw]


def effective_n(ws: Sequence[float]) -> float:
    """The effective number of snapshots, 1 / sum(w^2), of normalised weights."""
    return 1.0 / math.fsum(w * w for w in ws) if ws else 0.0
