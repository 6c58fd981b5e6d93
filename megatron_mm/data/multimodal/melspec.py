"""Reference Whisper-style log-mel in numpy/torch, for the PyTorch loader.

torchaudio and librosa are not installed on the CPU machines, so the Slaney mel
filterbank is written out here (librosa's `filters.mel(norm="slaney")` formula); the STFT is
`torch.stft` with Whisper's settings (periodic Hann window, centred frames, reflect
padding) and resampling is `scipy.signal.resample_poly`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy.signal import resample_poly

from megatron_mm.data.multimodal.samples import (
    DYNAMIC_RANGE, HOP, LOG_FLOOR, MEL_BINS, MEL_FMAX, N_FFT, SAMPLE_RATE,
)

_F_SP = 200.0 / 3  # Slaney mel scale: linear (1 mel = 66.7 Hz) below 1 kHz ...
_MIN_LOG_HZ, _MIN_LOG_MEL = 1000.0, 15.0
_LOGSTEP = math.log(6.4) / 27.0  # ... logarithmic above


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, hz / _F_SP)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), mel * _F_SP)


@lru_cache(maxsize=4)
def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = MEL_BINS,
                   fmin: float = 0.0, fmax: float = MEL_FMAX) -> np.ndarray:
    """[n_mels, n_fft//2 + 1] triangular filters equally spaced on the Slaney mel scale,
    each scaled by 2 / (its width in Hz) so its area is 1 (Slaney normalisation)."""
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    rising = (fft_hz[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - fft_hz[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """`wave` (float32, mono) at `rate` Hz resampled to 16 kHz."""
    if rate == SAMPLE_RATE:
        return wave
    g = math.gcd(rate, SAMPLE_RATE)
    return resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)


def log_mel(wave: np.ndarray, frames: int) -> torch.Tensor:
    """Whisper-style normalised log-mel [80, frames] of a 16 kHz mono float waveform."""
    window = torch.hann_window(N_FFT)  # periodic, as Whisper's
    stft = torch.stft(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), N_FFT, HOP,
                      window=window, center=True, pad_mode="reflect", return_complex=True)
    mel = torch.from_numpy(mel_filterbank()) @ stft.abs().square()
    x = mel.clamp_min(LOG_FLOOR).log10()
    x = torch.maximum(x, x.max() - DYNAMIC_RANGE)
    x = (x + 4.0) / 4.0
    out = torch.zeros(MEL_BINS, frames)
    out[:, :min(frames, x.shape[1])] = x[:, :frames]
    return out
