"""Timestamps and temporal tokens of Strefer's instruction data (Strefer §3.2, A.3.4).

Questions refer to moments as `HH:MM:SS.xxx` text; a model that learns temporal tokens reads them instead as
one of M + 1 anchor tokens `<0>` ... `<M>` spread evenly over the video (Grounded-VideoLLM's representation):
a time τ in a video of L seconds is the token `<k>` with k = round(M·τ/L), and `<k>` stands for τ = L·k/M,
the centre of the times that round to it (the first and last anchors are the ends of the video). The paper
trains 32 tokens, M = 31.

    format_timestamp(19.228)               -> "00:00:19.228"
    to_temporal_token(19.228, 90.0)        -> "<7>"
    timestamps_to_tokens("between 00:00:05.000 and 00:00:12.210", 40.0) -> "between <4> and <9>"
"""

from __future__ import annotations

import math
import re

DEFAULT_M = 31  # Strefer A.3.4: 32 temporal tokens
# A time up to this far past the end still counts as the end: timestamps are rounded to milliseconds, so
# a range that ends exactly at the video's end can read up to half a millisecond past it.
END_TOLERANCE_S = 0.001
MAX_HOURS = 99  # two hour digits

# HH:MM:SS with optional fraction (1-3 digits). Hours are required, so "5:30" in prose is not a timestamp.
TIMESTAMP = re.compile(r"(?<![\d:.])(\d{2}):([0-5]\d):([0-5]\d)(?:\.(\d{1,3}))?(?![\d:]|\.\d)")
_TOKEN = re.compile(r"^<(0|[1-9]\d*)>$")


def _check_seconds(seconds: float, what: str = "time") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {seconds!r}")
    seconds = float(seconds)
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be finite, got {seconds}")
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {seconds}")
    return seconds


def format_timestamp(seconds: float, *, round_down: bool = False) -> str:
    """`HH:MM:SS.xxx`, rounded to the nearest millisecond (65.5 -> "00:01:05.500"), or down with `round_down`
    (the end of a range, which must not pass the end of the video)."""
    millis = math.floor(_check_seconds(seconds) * 1000 + (0 if round_down else 0.5))
    hours, rest = divmod(millis, 3_600_000)
    if hours > MAX_HOURS:
        raise ValueError(f"{seconds} s is past {MAX_HOURS} hours, which HH:MM:SS.xxx cannot write")
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


def parse_timestamp(text: str) -> float:
    """Seconds of `HH:MM:SS` or `HH:MM:SS.x` .. `HH:MM:SS.xxx` (the fraction is a decimal fraction:
    "00:00:05.5" is 5.5 s)."""
    match = TIMESTAMP.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a timestamp: write HH:MM:SS.xxx, e.g. 00:01:05.250")
    hours, minutes, secs, fraction = match.groups()
    value = int(hours) * 3600 + int(minutes) * 60 + int(secs)
    return value + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _check_scale(duration: float, m: int) -> float:
    duration = _check_seconds(duration, "duration")
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (the number of temporal token intervals) must be an int >= 1, got {m!r}")
    return duration


def to_temporal_token(t: float, duration: float, m: int = DEFAULT_M) -> str:
    """`<k>` with k = round(m·t/duration), rounding halves up; t must lie inside the video."""
    duration = _check_scale(duration, m)
    t = _check_seconds(t)
    if t > duration + END_TOLERANCE_S:
        raise ValueError(f"time {t} s is past the end of the video ({duration} s)")
    k = math.floor(m * min(t, duration) / duration + 0.5)
    return f"<{k}>"


def token_index(token: str, m: int = DEFAULT_M) -> int:
    """k of `<k>`, checked to be one of the m + 1 anchors."""
    match = _TOKEN.fullmatch(token.strip()) if isinstance(token, str) else None
    if match is None:
        raise ValueError(f"{token!r} is not a temporal token: write <k>, e.g. <7>")
    k = int(match.group(1))
    if k > m:
        raise ValueError(f"temporal token {token} is past the last anchor <{m}>")
    return k


def from_temporal_token(token: str, duration: float, m: int = DEFAULT_M) -> float:
    """The time `<k>` stands for, duration·k/m: the centre of the times that round to k (A.3.4's inverse;
    `<0>` is the start and `<m>` the end of the video)."""
    duration = _check_scale(duration, m)
    return duration * token_index(token, m) / m


def timestamps_to_tokens(text: str, duration: float, m: int = DEFAULT_M) -> str:
    """`text` with every HH:MM:SS(.xxx) timestamp replaced by its temporal token."""
    _check_scale(duration, m)
    return TIMESTAMP.sub(lambda match: to_temporal_token(parse_timestamp(match.group(0)), duration, m), text)


def find_timestamps(text: str) -> list[float]:
    """Seconds of every timestamp in `text`, in order."""
    return [parse_timestamp(match.group(0)) for match in TIMESTAMP.finditer(text)]


def normalize_timestamps(text: str) -> str:
    """`text` with every timestamp rewritten as HH:MM:SS.xxx ("00:00:05" -> "00:00:05.000")."""
    return TIMESTAMP.sub(lambda match: format_timestamp(parse_timestamp(match.group(0))), text)
