"""Music features per video frame (librosa): log-mel, the 35-d FACT/EDGE baseline set, tempo, beats.

The audio stream is decoded by :func:`dwm.shared.media.load_audio` (ffmpeg with an explicit
``-map 0:a:0``, so a cover-art picture stream is never mistaken for the content). Features are
computed at librosa's own hop (a multiple of 64, which chroma_cens' CQT needs) and then sampled
at each video frame's time, so any video fps works.
Events (onset peaks, beats) are placed on the nearest video frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import librosa
import numpy as np

from dwm.shared.contract import AUDIO_BASELINE_DIM
from dwm.shared.media import load_audio

from .base import ArraySpec, Extractor, VideoContext


@dataclass
class AudioBatch:
    path: str


def _at_frames(feat: np.ndarray, feat_fps: float, n_frames: int, fps: float) -> np.ndarray:
    """(K, D) features at feat_fps -> (n_frames, D) at video frame times (linear interpolation)."""
    k = feat.shape[0]
    t_frames = np.arange(n_frames) / fps * feat_fps  # in feature-frame units
    if k == 0:
        return np.zeros((n_frames, feat.shape[1]), np.float32)
    src = np.arange(k)
    out = np.empty((n_frames, feat.shape[1]), np.float32)
    for d in range(feat.shape[1]):
        out[:, d] = np.interp(t_frames, src, feat[:, d])
    return out


def _one_hot(times: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    v = np.zeros(n_frames, np.float32)
    idx = np.round(np.asarray(times) * fps).astype(np.int64)
    idx = idx[(idx >= 0) & (idx < n_frames)]
    v[idx] = 1.0
    return v


def _memo_key(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_memo_key(x) for x in v)
    return v


def _memoize_cqt_filters(max_entries: int = 64) -> None:
    """Keep librosa's CQT filter banks for the process.

    chroma_cens' CQT rebuilds the same filter bank (7 octaves of wavelets, FFT'd and sparsified)
    on every call: about 60% of chroma_cens and the largest single cost of this extractor on a
    short clip. The bank depends only on its arguments (sample rate, frequencies, ...), so the
    first result per argument set is kept and a copy is handed out (librosa rescales it in
    place). The numbers are the same; where librosa has no such function it is left alone."""
    # deferred: importing constantq compiles librosa's numba kernels (seconds, up to ~30 s cold)
    from librosa.core import constantq

    name = "__vqt_filter_fft"  # module-level: called by this plain name inside constantq
    build = constantq.__dict__.get(name)
    if build is None or getattr(build, "_dwm_memo", False):
        return
    memo: dict[Any, tuple] = {}

    def cached(*args: Any, **kwargs: Any):
        try:
            key = (_memo_key(args), tuple(sorted((k, _memo_key(v)) for k, v in kwargs.items())))
            hash(key)
        except TypeError:  # an unhashable argument (a callable window is fine): no memo
            return build(*args, **kwargs)
        hit = memo.get(key)
        if hit is None:
            hit = build(*args, **kwargs)
            if len(memo) < max_entries:
                memo[key] = hit
        basis, n_fft, lengths = hit
        return basis.copy(), n_fft, np.array(lengths, copy=True)

    cached._dwm_memo = True  # type: ignore[attr-defined]
    setattr(constantq, name, cached)


class AudioExtractor(Extractor):
    name = "audio"
    version = "1"
    kind = "audio"
    hop_length = 512  # librosa hop; must be a multiple of 64 for chroma_cens (7-octave CQT)

    def config(self) -> dict[str, Any]:
        a = self.cfg.audio
        return {"sample_rate": a.sample_rate, "n_mels": a.n_mels, "hop_length": self.hop_length,
                "n_fft": 2048}

    def arrays(self, ctx: VideoContext) -> dict[str, ArraySpec]:
        return {
            "mel": ArraySpec((self.cfg.audio.n_mels,), "float16", "log-mel (dB) per video frame"),
            "baseline": ArraySpec((AUDIO_BASELINE_DIM,), "float16",
                                  "onset env 1, MFCC 20, chroma_cens 12, onset peak 1, beat 1"),
        }

    def process(self, batch: AudioBatch) -> dict[str, Any]:
        ctx = self.ctx
        sr, hop = int(self.cfg.audio.sample_rate), self.hop_length
        seconds = ctx.num_frames / ctx.fps
        y, _ = load_audio(batch.path, sr, duration=seconds + 1.0)
        n = ctx.num_frames
        feat_fps = sr / hop
        # an audio track shorter than the video is padded with silence, so every frame has
        # features of what is heard at its time (not a repeat of the last sound)
        need = int(np.ceil(seconds * sr)) + 2048
        if y.size < need:
            y = np.pad(y, (0, need - y.size))
        # one power STFT for the three mel-based features (librosa would compute it three
        # times): the same arguments as librosa's own path from ``y``, so the same numbers
        power = np.abs(librosa.stft(y, n_fft=2048, hop_length=hop, center=True,
                                    pad_mode="constant")) ** 2
        mel = librosa.feature.melspectrogram(S=power, sr=sr, n_mels=self.cfg.audio.n_mels)
        log_mel = librosa.power_to_db(mel, ref=1.0, top_db=80.0).T  # (K, n_mels)
        # onset strength and MFCC both start from the 128-band log-mel of librosa's defaults
        log_mel128 = librosa.power_to_db(librosa.feature.melspectrogram(S=power, sr=sr))
        env = librosa.onset.onset_strength(S=log_mel128, sr=sr, hop_length=hop)  # (K,)
        mfcc = librosa.feature.mfcc(S=log_mel128, sr=sr, n_mfcc=20).T  # (K, 20)
        _memoize_cqt_filters()
        chroma = librosa.feature.chroma_cens(y=y, sr=sr, hop_length=hop, n_chroma=12).T  # (K, 12)
        peaks = librosa.onset.onset_detect(onset_envelope=env, sr=sr, hop_length=hop, units="time")
        tempo, beats = librosa.beat.beat_track(onset_envelope=env, sr=sr, hop_length=hop,
                                               units="time")
        tempo = float(np.atleast_1d(tempo)[0])
        k = min(len(env), len(mfcc), len(chroma), len(log_mel))
        cont = np.concatenate([env[:k, None], mfcc[:k], chroma[:k]], axis=1)
        cont_f = _at_frames(cont, feat_fps, n, ctx.fps)
        mel_f = _at_frames(log_mel[:k], feat_fps, n, ctx.fps)
        baseline = np.concatenate(
            [cont_f, _one_hot(peaks, n, ctx.fps)[:, None], _one_hot(beats, n, ctx.fps)[:, None]],
            axis=1)
        beat_frames = np.round(np.asarray(beats) * ctx.fps).astype(np.int64)
        beat_frames = beat_frames[(beat_frames >= 0) & (beat_frames < n)]
        return {
            "mel": mel_f.astype(np.float16),
            "baseline": baseline.astype(np.float16),
            "_attrs": {"tempo": round(tempo, 3), "beat_times": [round(float(b), 4) for b in beats],
                       "beat_frames": beat_frames.tolist(), "audio_seconds": round(y.size / sr, 3),
                       "feature_fps": feat_fps},
        }
