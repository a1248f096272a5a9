"""From a raw ``Recording`` to the ``PairedNight`` the models see.

Order of operations, per night (``prepare_night``):

1. trim the signal to the scored epochs (samples past the last scored epoch have no label);
2. rejection mask (config, recording, auto-rejection) and derivations (``montage``);
3. zero-phase Butterworth band-pass at the recording's own rate (``sosfiltfilt``: forward and
   backward, so the filter adds no delay between signal and labels);
4. polyphase resampling to ``data_cfg.sampling_rate`` (``resample_poly`` with the exact rational
   ratio, e.g. 256 -> 200 Hz is up 25 / down 32, 100 -> 200 Hz is up 2 / down 1);
5. robust scaling per channel over the whole night, as U-Sleep does: subtract the median, divide by
   the inter-quartile range, then clip at +-clip_iqr (the scaled units are IQRs).

Memory: the derived channels are processed one at a time (float64 only for the channel in hand) and
written into a preallocated float32 result, so a night costs about its float32 derivations twice
plus a few single-channel temporaries, never a float64 copy of everything.
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import math

import numpy as np
import scipy.signal

from eegkd_jax.data import montage
from eegkd_jax.data.recording import DataError, PairedNight, Recording

logger = logging.getLogger(__name__)

BUTTER_ORDER = 4  # per pass; filtfilt squares the magnitude response
MAX_RESAMPLE_FACTOR = 1000  # up or down beyond this means a rate we should not silently approximate


def whole_samples(seconds: float, rate: float, source: str, what: str) -> int:
    """``seconds * rate`` as an int, or a DataError if it is not a whole number of samples."""
    n = seconds * rate
    if not math.isclose(n, round(n), abs_tol=1e-6):
        raise DataError(source, f"{what}: {seconds:g} s is not a whole number of samples at {rate:g} Hz")
    return int(round(n))


def bandpass_sos(band, rate: float, source: str = "") -> np.ndarray | None:
    """Second-order sections of the band-pass for ``band = (low, high)`` Hz (either may be None for a
    high- or low-pass); None if ``band`` is None."""
    if band is None:
        return None
    low, high = band
    nyquist = rate / 2.0
    if high is not None and not 0 < high < nyquist:
        raise DataError(
            source,
            f"band-pass upper edge {high:g} Hz must lie below Nyquist ({nyquist:g} Hz at {rate:g} Hz)",
        )
    if low is not None and not 0 < low < (high or nyquist):
        raise DataError(
            source, f"band-pass lower edge {low:g} Hz must lie in (0, {high or nyquist:g}) Hz"
        )
    if low is None and high is None:
        return None
    if low is None:
        return scipy.signal.butter(BUTTER_ORDER, high, btype="lowpass", fs=rate, output="sos")
    if high is None:
        return scipy.signal.butter(BUTTER_ORDER, low, btype="highpass", fs=rate, output="sos")
    return scipy.signal.butter(BUTTER_ORDER, (low, high), btype="bandpass", fs=rate, output="sos")


def resample_ratio(rate_in: float, rate_out: float, source: str = "") -> tuple[int, int]:
    """(up, down) with rate_out / rate_in == up / down exactly, in lowest terms."""
    def exact(rate):
        return fractions.Fraction(rate).limit_denominator(10**6)

    ratio = exact(rate_out) / exact(rate_in)
    too_far = not math.isclose(float(ratio), rate_out / rate_in, rel_tol=1e-9)
    if too_far or max(ratio.numerator, ratio.denominator) > MAX_RESAMPLE_FACTOR:
        raise DataError(source, f"no simple rational resampling from {rate_in:g} Hz to {rate_out:g} Hz")
    return ratio.numerator, ratio.denominator


def robust_scale(x: np.ndarray, clip: float | None, source: str, name: str) -> np.ndarray:
    """(x - median) / IQR, clipped at +-clip; x is (time,). In place when x is float64."""
    q25, median, q75 = np.percentile(x, [25.0, 50.0, 75.0])
    iqr = q75 - q25
    if not iqr > 0:
        raise DataError(source, f"{name} has zero inter-quartile range over the night; cannot scale it")
    x -= median
    x /= iqr
    if clip is not None:
        np.clip(x, -clip, clip, out=x)
    return x


def _process(derived: np.ndarray, names, rate_in, rate_out, n_out, data_cfg, source) -> np.ndarray:
    """Filter, resample and scale each column of (time, channels) ``derived`` into float32."""
    pre = data_cfg.preprocess
    sos = bandpass_sos(pre.bandpass_hz, rate_in, source)
    up, down = resample_ratio(rate_in, rate_out, source)
    if pre.scaling not in ("robust", "none", None):
        raise ValueError(f"unknown data.preprocess.scaling {pre.scaling!r} (robust | none)")
    out = np.empty((n_out, derived.shape[1]), np.float32)
    for k, name in enumerate(names):
        x = derived[:, k].astype(np.float64)
        if sos is not None:
            x = scipy.signal.sosfiltfilt(sos, x)
        if (up, down) != (1, 1):
            x = scipy.signal.resample_poly(x, up, down)
        if x.shape[0] != n_out:  # cannot happen when the epoch grid is whole at both rates
            raise DataError(source, f"{name}: resampled to {x.shape[0]} samples, expected {n_out}")
        if pre.scaling == "robust":
            x = robust_scale(x, pre.clip_iqr, source, name)
        out[:, k] = x
    return out


def prepare_night(recording: Recording, data_cfg) -> PairedNight:
    """Derive, band-pass, resample, scale and trim one night.

    Args:
      recording: raw electrodes (time, channels) in microvolts at ``recording.sampling_rate``.
      data_cfg: the ``data`` config group: ``scalp_derivations``, ``ear_derivations``,
        ``ear_rejections``, ``auto_reject_ear``, ``sampling_rate``, ``epoch_seconds``, ``preprocess``.

    Returns:
      PairedNight with scalp (epochs * S, n_scalp) and ear (epochs * S, n_ear) float32 at
      ``data_cfg.sampling_rate``, S = epoch_seconds * sampling_rate, and the recording's labels.
    """
    source = recording.source or recording.subject
    if not math.isclose(recording.epoch_seconds, data_cfg.epoch_seconds):
        raise DataError(
            source,
            f"scored in {recording.epoch_seconds:g}-s epochs, config says "
            f"{data_cfg.epoch_seconds:g} s",
        )
    rate_in, rate_out = float(recording.sampling_rate), float(data_cfg.sampling_rate)
    epochs = int(recording.labels.shape[0])
    samples_in = whole_samples(data_cfg.epoch_seconds, rate_in, source, "epoch")
    samples_out = whole_samples(data_cfg.epoch_seconds, rate_out, source, "epoch at the model rate")
    if epochs == 0:
        raise DataError(source, "no scored epochs")

    # Views, not copies: everything after the last scored epoch is dropped here, before the
    # montage looks for flat or noisy electrodes in it.
    n_in = epochs * samples_in
    if recording.num_samples > n_in:
        recording = dataclasses.replace(
            recording, scalp=recording.scalp[:n_in], ear=recording.ear[:n_in]
        )

    rejections = data_cfg.ear_rejections
    rejections = rejections.to_dict() if hasattr(rejections, "to_dict") else dict(rejections or {})
    reasons = montage.rejections(recording, rejections, auto=bool(data_cfg.auto_reject_ear))
    if reasons:
        # Which electrodes a night lost, and why, belongs in the build log next to its shards.
        listed = "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items()))
        logger.info("%s: rejected %s", recording.subject, listed)
    rejected = frozenset(reasons)

    channels = {}
    for group, specs in (("scalp", data_cfg.scalp_derivations), ("ear", data_cfg.ear_derivations)):
        derived, names = montage.derive(recording, tuple(specs or ()), rejected=rejected)
        processed = _process(
            derived, names, rate_in, rate_out, epochs * samples_out, data_cfg, source
        )
        channels[group] = (processed, names)
        del derived

    return PairedNight(
        subject=recording.subject,
        sampling_rate=rate_out,
        epoch_samples=samples_out,
        scalp=channels["scalp"][0],
        scalp_names=channels["scalp"][1],
        ear=channels["ear"][0],
        ear_names=channels["ear"][1],
        labels=recording.labels.astype(np.int8),
        source=source,
    )
