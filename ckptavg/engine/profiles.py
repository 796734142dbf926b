"""Averaging profiles chosen after the fact: the weight of each snapshot from where it was
saved, whatever the spacing of the saves.

Positions t_1 < ... < t_N are the tokens each input had seen in training when every input
records them, else their steps when every input has one, else their epochs (lengths such as
a half-life take SI suffixes: ema:halflife=50B). Input i stands for the interval (t_i - D_i, t_i], D_i = t_i - t_{i-1}, D_1 = D_2;
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
from fractions import Fraction

from ckptavg.errors import OptionError
from ckptavg.options import SI

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
    """A parameter's value; a length in positions may carry an SI suffix (halflife=50B:
    fifty billion tokens)."""
    scale = 1.0
    if key in ("halflife", "per") and text[-1:] and text[-1].lower() in SI:
        text, scale = text[:-1], float(SI[text[-1].lower()])
    try:
        value = float(text) * scale
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


def _log_sigma(g: float) -> float:
    """log sigma_rel of the power EMA with exponent g (in logs: no overflow for huge g)."""
    return 0.5 * (math.log1p(g) - 2 * math.log(g + 2) - math.log(g + 3))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of EDM2's power EMA with this relative standard deviation: the largest
    root of sigma(g) = sqrt((g + 1) / ((g + 2)^2 (g + 3))), which lies above 0 for
    sigma_rel < sigma(0) = 1/sqrt(12) and where sigma falls as g grows. Found by bisection
    on log g, in logs, so that any sigma_rel in range has its root (1e-160 -> about 1e160)."""
    target = math.log(sigma_rel)
    lo, hi = -745.0, 1.0  # log g
    while _log_sigma(math.exp(hi)) > target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _log_sigma(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


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


def _log(q: Fraction) -> float:
    """log of a positive exact number, however large or small (big ints have exact logs)."""
    return math.log(q.numerator) - math.log(q.denominator)


def _ratio(q: Fraction, h: float) -> float:
    """q / h for q >= 0 exact and h > 0: inf when it does not fit a float."""
    if q == 0:
        return 0.0
    x = _log(q) - math.log(h)
    return math.exp(x) if x < 709 else math.inf


def _log_raw(profile: Profile, t: list[Fraction], gaps: list[Fraction]) -> list[float]:
    """log of each input's unnormalised weight: its kernel integrated over (t_i - D_i, t_i],
    written so that no difference of nearly equal numbers is taken and nothing overflows."""
    T = t[-1]
    if profile.name == "time":
        return [_log(d) for d in gaps]
    if profile.name == "ema":
        # 2^(-(T-b)/h) - 2^(-(T-b+D)/h) = 2^(-(T-b)/h) (1 - 2^(-D/h))
        h, ln2 = profile.halflife, math.log(2)
        return [-_ratio(T - b, h) * ln2 + math.log(-math.expm1(-_ratio(d, h) * ln2))
                for b, d in zip(t, gaps)]
    if profile.name == "power":
        # (b^(g+1) - a^(g+1)) / (g+1) = b^(g+1) (1 - (a/b)^(g+1)) / (g+1), a clipped at 0
        g1 = profile.gamma + 1
        out = []
        for b, d in zip(t, gaps):
            if b <= 0:
                out.append(-math.inf)
                continue
            frac = d / b  # 1 - a/b, exact
            tail = 1.0 if frac >= 1 else -math.expm1(g1 * math.log1p(-float(frac)))
            # b^(g+1) relative to T^(g+1), from the exact distance to T (a log of b alone
            # loses the small differences of positions past 2**53)
            rel = g1 * math.log1p(-float((T - b) / T))
            out.append(rel + math.log(tail) - math.log(g1) if tail > 0 else -math.inf)
        return out
    # wsm: f(x_{i-1}) - f(x_i), x_i = (t_i - t0) / (T - t0), differences taken exactly
    t0 = t[0] - gaps[0]
    xs = [Fraction(0)] + [(ti - t0) / (T - t0) for ti in t]
    raw = []
    for a, b in zip(xs, xs[1:]):
        dx = float(b - a)
        if profile.decay == "linear":
            raw.append(dx)
        elif profile.decay == "minus-sqrt":
            raw.append(dx / (math.sqrt(float(a)) + math.sqrt(float(b))))
        else:  # (cos(pi a) - cos(pi b)) / 2 = sin(pi (a + b) / 2) sin(pi (b - a) / 2)
            raw.append(math.sin(math.pi * float(a + b) / 2) * math.sin(math.pi * dx / 2))
    return [math.log(x) if x > 0 else -math.inf for x in raw]


def weights(profile: Profile, positions: Sequence[int | float]) -> list[float]:
    """Each input's weight (summing to 1) under `profile`, for positions in increasing
    order. Positions are taken exactly (steps past 2**64 stay distinct) and the weights are
    computed in log space, stable over every parameter the parser accepts."""
    n = len(positions)
    if n == 0:
        return []
    if profile.name == "uniform" or n == 1:
        return [1.0 / n] * n
    t = [Fraction(x) for x in positions]
    if any(b <= a for a, b in zip(t, t[1:])):
        raise _fail(profile.spec, "the inputs' positions must increase strictly (two inputs "
                    "saved at the same step or epoch)")
    gaps = [t[1] - t[0]] + [b - a for a, b in zip(t, t[1:])]
    logs = _log_raw(profile, t, gaps)
    top = max(logs)
    if top == -math.inf or math.isnan(top):
        raise _fail(profile.spec, "gives no weight to these inputs (check their positions)")
    raw = [math.exp(x - top) for x in logs]
    total = math.fsum(raw)
    return [x / total for x in raw]


def effective_n(ws: Sequence[float]) -> float:
    """The effective number of snapshots, 1 / sum(w^2), of normalised weights."""
    return 1.0 / math.fsum(w * w for w in ws) if ws else 0.0
