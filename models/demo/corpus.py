"""Build the demo speech corpus: seeded, resumable, one synthesis worker by default.

    python -m fastslm.models.demo.corpus --out work/corpus --seed 0 [--train-utterances N] [--jobs 1]
    python -m fastslm.models.demo.corpus --out work/corpus --check

Layout under ``--out``::

    audio/<split>/<id>.flac     16 kHz mono, PCM 16 bit
    <split>.jsonl               one line per utterance:
        {"id", "text", "voice", "params": {"synth": {...}, "augment": {...} | null},
         "seconds", "path"}      (path is relative to --out)

Splits, built in this order (the small eval splits first):

* ``eval_seen``   -- 200 held-out sentences x training voices (same voice mix as train), clean;
* ``eval_unseen`` -- 100 other held-out sentences x :data:`voices.HELDOUT_VOICE`, clean;
* ``calib``       -- :data:`N_CALIB` further held-out sentences x the training mix, augmented like
  train: INT8 calibration audio that no gate scores and no test subset holds (jfk.flac, the only
  real recording, stays out of it too);
* ``gate``        -- :data:`N_GATE` further held-out sentences x eval_seen's voices, clean: what the
  recipe's INT8 WER gate scores (``fastslm-export --eval-corpus``), so the sets the recipe reports
  (eval_seen, eval_unseen, jfk) never choose which layers stay float;
* ``select``      -- :data:`N_SELECT` further held-out sentences x eval_seen's voices, clean: what picks
  the best checkpoint during training, so no set the recipe reports chooses the weights either;
* ``train``       -- training sentences (a seeded permutation, cycled) x training voices.

``--mix`` picks the training voices and how they vary (eval splits never change with it):

* ``shipped`` -- the shipped model's corpus: 2/3 Piper, 1/3 spread evenly over the espeak-ng /
  flite voices; half augmented (:mod:`augment`);
* ``wide`` -- more distinct audio per utterance: 1/2 Piper with wider length / noise settings,
  1/2 over the espeak-ng / flite voices plus :data:`voices.ESPEAK_EXTRA_VOICES` and flite kal
  at wider speed / pitch; 70% augmented with the wide draws (pitch shift, low-pass, lower SNR).

Every utterance is a pure function of ``(seed, split, index)``, so a run can be killed at any
time and restarted with the same arguments: utterances already in the manifest (with a valid
audio file) are skipped, an audio file written just before a kill gets its manifest line
without being synthesized again, a torn last manifest line is dropped. Audio files are
written to a temporary name and renamed; manifest lines are appended with one ``write``.
Raising ``--train-utterances`` later extends the corpus with the same first utterances.
Ids, texts, voices and params are exactly reproducible; Piper's audio is not bit-exact between
runs (its ONNX graph draws its own sampling noise), espeak-ng / flite audio is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import soundfile as sf

from . import augment, texts, voices

SAMPLE_RATE = 16000
SPLITS = ("eval_seen", "eval_unseen", "calib", "gate", "select", "train")
N_EVAL_SEEN = 200
N_EVAL_UNSEEN = 100
N_CALIB = 48  # held-out sentences after the eval ones (voices.main measures on the list's tail)
# A 1-point INT8 criterion needs a few thousand words: 41 utterances let a +1.3 pt loss through.
N_GATE = 200
# Checkpoint selection used to score the last 40 eval_seen utterances, so eval_seen was not wholly held out.
N_SELECT = 40
# Sized from a measured build (300 train utterances, seed 0, nice 10, 2 shared cores, load ~3):
# 0.16 s CPU and 0.20 s wall per utterance, 2.8 s of audio each -> 20000 utterances ~ 15.7 h of
# audio in ~55-70 min of one core (~2 h if the niced job only gets half a core).
DEFAULT_TRAIN_UTTERANCES = 20000
PIPER_FRACTION = 2 / 3
AUGMENT_FRACTION = 0.5

SynthFn = Callable[[str, str, dict], np.ndarray]


@dataclass(frozen=True)
class Utterance:
    id: str
    split: str
    text: str
    voice: str
    params: dict = field(hash=False, compare=False)


@dataclass(frozen=True)
class Mix:
    """Which voices the training (and calibration) utterances get and how much they vary."""

    name: str
    piper_fraction: float
    other_voices: tuple[str, ...]
    augment_fraction: float
    wide: bool  # wider synthesis params (voices.sample_params) and augmentation draws

    def pick_voice(self, rng: random.Random) -> str:
        if rng.random() < self.piper_fraction:
            return rng.choice(voices.PIPER_VOICES)
        return rng.choice(self.other_voices)


MIXES = {
    "shipped": Mix("shipped", PIPER_FRACTION, voices.ESPEAK_TRAIN_VOICES + voices.FLITE_TRAIN_VOICES,
                   AUGMENT_FRACTION, False),
    "wide": Mix("wide", 0.5, voices.ESPEAK_TRAIN_VOICES + voices.ESPEAK_EXTRA_VOICES + voices.FLITE_TRAIN_VOICES
                + voices.FLITE_EXTRA_VOICES, 0.7, True),
}
DEFAULT_MIX = "wide"
EVAL_MIX = MIXES["shipped"]  # eval_seen keeps the voices and settings it was built with


def _pick_voice(rng: random.Random) -> str:
    return EVAL_MIX.pick_voice(rng)


def shipped_subset_keys() -> frozenset[str]:
    """Normalized texts of the evaluation subset shipped with the package (what tests score)."""
    from ...runtime.loading import DEMO_EVAL_SUBSET  # noqa: PLC0415

    keys = set()
    for jsonl in Path(DEMO_EVAL_SUBSET).glob("*.jsonl"):
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            if line.strip():
                keys.add(texts.normalize_key(json.loads(line)["text"]))
    return frozenset(keys)


def plan(
    seed: int = 0,
    n_train: int = DEFAULT_TRAIN_UTTERANCES,
    sentences: texts.SentenceSets | None = None,
    n_eval_seen: int = N_EVAL_SEEN,
    n_eval_unseen: int = N_EVAL_UNSEEN,
    mix: str = DEFAULT_MIX,
    n_calib: int = N_CALIB,
    n_gate: int = N_GATE,
    n_select: int = N_SELECT,
) -> dict[str, list[Utterance]]:
    """Every utterance of every split, deterministically from ``seed`` (and ``mix`` for calib/train)."""
    sets = sentences or texts.load_sentences(seed)
    needed = n_eval_seen + n_eval_unseen + n_calib + n_gate + n_select
    if len(sets.heldout) < needed:
        raise ValueError(f"only {len(sets.heldout)} held-out sentences for {needed} eval, calibration, gate and "
                         f"selection utterances")
    train_mix = MIXES[mix]
    out: dict[str, list[Utterance]] = {s: [] for s in SPLITS}

    def make(split: str, i: int, text: str, voice_fn: Callable[[random.Random], str], aug: bool,
             the_mix: Mix = EVAL_MIX) -> Utterance:
        rng = random.Random(f"{seed}:{split}:{i}")
        voice = voice_fn(rng)
        params = {"synth": voices.sample_params(voice, rng, the_mix.wide), "augment": None}
        if aug and rng.random() < the_mix.augment_fraction:
            params["augment"] = augment.sample_augment(rng, the_mix.wide)
        return Utterance(f"{split}-{i:06d}", split, text, voice, params)

    for i in range(n_eval_seen):
        out["eval_seen"].append(make("eval_seen", i, sets.heldout[i], _pick_voice, False))
    for i in range(n_eval_unseen):
        text = sets.heldout[n_eval_seen + i]
        out["eval_unseen"].append(make("eval_unseen", i, text, lambda r: voices.HELDOUT_VOICE, False))
    # calibration and gate sentences: the next held-out ones that no shipped test subset holds (the
    # subset was cut from an older sentence list, whose held-out order differs)
    taken = shipped_subset_keys()
    later = [t for t in sets.heldout[n_eval_seen + n_eval_unseen:] if texts.normalize_key(t) not in taken]
    if len(later) < n_calib + n_gate + n_select:
        raise ValueError(f"only {len(later)} held-out sentences for {n_calib} calibration, {n_gate} gate and "
                         f"{n_select} selection utterances")
    for i in range(n_calib):
        out["calib"].append(make("calib", i, later[i], train_mix.pick_voice, True, train_mix))
    for i in range(n_gate):
        out["gate"].append(make("gate", i, later[n_calib + i], _pick_voice, False))
    for i in range(n_select):
        out["select"].append(make("select", i, later[n_calib + n_gate + i], _pick_voice, False))
    for i in range(n_train):
        text = sets.train[i % len(sets.train)]
        out["train"].append(make("train", i, text, train_mix.pick_voice, True, train_mix))
    return out


def render(utt: Utterance, synth: SynthFn) -> np.ndarray:
    """Synthesize (and augment) one utterance: float32 16 kHz mono."""
    audio = synth(utt.voice, utt.text, utt.params["synth"])
    if utt.params.get("augment"):
        audio = augment.apply_augment(audio, utt.params["augment"], SAMPLE_RATE)
    return np.asarray(audio, dtype=np.float32)


# ------------------------------------------------------------------------------- manifest
def audio_valid(path: Path) -> bool:
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - any unreadable file is simply redone
        return False
    return info.frames > 0 and info.samplerate == SAMPLE_RATE and info.channels == 1


def _rel_path(split: str, uid: str) -> str:
    return f"audio/{split}/{uid}.flac"


def read_manifest(out: Path, split: str, repair: bool = True) -> dict[str, dict]:
    """The valid records of ``<split>.jsonl`` by id (first one wins).

    With ``repair``, the file is rewritten when it holds a torn last line, bad JSON, duplicate
    ids or records whose audio file is missing or broken.
    """
    path = out / f"{split}.jsonl"
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = bool(lines and lines[-1])  # a last line without "\n" was cut by a kill
    records: dict[str, dict] = {}
    dirty = torn
    for line in lines[:-1]:
        if not line.strip():
            dirty = True
            continue
        try:
            rec = json.loads(line)
            uid = rec["id"]
        except (ValueError, KeyError, TypeError):
            dirty = True
            continue
        if uid in records or not audio_valid(out / rec["path"]):
            dirty = True
            continue
        records[uid] = rec
    if repair and dirty:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()), encoding="utf-8")
        os.replace(tmp, path)
    return records


def _append_line(fd: int, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode("utf-8")
    written = os.write(fd, data)  # O_APPEND + one write: a kill leaves a whole line or a torn tail
    if written != len(data):
        raise OSError(f"short write to manifest ({written} of {len(data)} bytes)")


def _write_audio(path: Path, audio: np.ndarray) -> float:
    tmp = path.with_name(path.stem + ".tmp.flac")
    sf.write(str(tmp), np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)
    return len(audio) / SAMPLE_RATE


def _record(utt: Utterance, seconds: float) -> dict:
    return {
        "id": utt.id,
        "text": utt.text,
        "voice": utt.voice,
        "params": utt.params,
        "seconds": round(seconds, 3),
        "path": _rel_path(utt.split, utt.id),
    }


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm  # noqa: PLC0415

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="utt", file=sys.stderr,
                mininterval=0.5 if tty else 60.0, dynamic_ncols=tty, smoothing=0.05)


def build_split(
    out: Path,
    split: str,
    utterances: list[Utterance],
    synth: SynthFn | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> int:
    """Make every missing utterance of one split; returns how many were synthesized now."""
    out = Path(out)
    audio_dir = out / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    for stale in audio_dir.glob("*.tmp.flac"):
        stale.unlink()
    done = read_manifest(out, split)
    by_id = {u.id: u for u in utterances}
    for uid, rec in done.items():
        u = by_id.get(uid)
        if u is not None and (u.text != rec["text"] or u.voice != rec["voice"]):
            raise SystemExit(
                f"{out / (split + '.jsonl')}: {uid} was built with other settings (--seed or --mix?); use a new --out or the same settings"
            )
    todo: list[Utterance] = []
    fd = os.open(out / f"{split}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for u in utterances:
            if u.id in done:
                continue
            path = out / _rel_path(split, u.id)
            if audio_valid(path):  # written just before a kill: only the manifest line is missing
                _append_line(fd, _record(u, sf.info(str(path)).frames / SAMPLE_RATE))
                done[u.id] = {}
                continue
            todo.append(u)
        bar = _progress(len(utterances), len(utterances) - len(todo), split) if progress else None
        made = 0
        for u, audio in _rendered(todo, synth, jobs):
            seconds = _write_audio(out / _rel_path(split, u.id), audio)
            _append_line(fd, _record(u, seconds))
            made += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return made
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ synthesis workers
_WORKER_SYNTH: SynthFn | None = None


def _worker_init() -> None:
    global _WORKER_SYNTH
    _WORKER_SYNTH = voices.Synthesizer(threads=1)


def _worker_render(u: Utterance) -> tuple[Utterance, np.ndarray]:
    assert _WORKER_SYNTH is not None
    return u, render(u, _WORKER_SYNTH)


def _rendered(todo: list[Utterance], synth: SynthFn | None, jobs: int) -> Iterable[tuple[Utterance, np.ndarray]]:
    if not todo:
        return
    if jobs <= 1 or synth is not None:
        synth = synth or voices.Synthesizer(threads=1)
        for u in todo:
            yield u, render(u, synth)
        return
    import multiprocessing as mp  # noqa: PLC0415

    with mp.get_context("spawn").Pool(jobs, initializer=_worker_init) as pool:
        yield from pool.imap(_worker_render, todo, chunksize=4)


# ------------------------------------------------------------------------------------- CLI
def build(out: Path, seed: int = 0, n_train: int = DEFAULT_TRAIN_UTTERANCES, jobs: int = 1,
          synth: SynthFn | None = None, splits: Iterable[str] = SPLITS, progress: bool = True,
          mix: str = DEFAULT_MIX) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    the_plan = plan(seed, n_train, mix=mix)
    the_mix = MIXES[mix]
    info = {"seed": seed, "train_utterances": n_train, "sample_rate": SAMPLE_RATE, "mix": mix,
            "train_voices": sorted(set(voices.PIPER_VOICES + the_mix.other_voices)),
            "heldout_voice": voices.HELDOUT_VOICE}
    (out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    for split in SPLITS:
        if split not in splits:
            continue
        t0 = time.time()
        made = build_split(out, split, the_plan[split], synth=synth, jobs=jobs, progress=progress)
        print(f"{split}: {made} synthesized in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print("done", file=sys.stderr, flush=True)


def ship_split(out: Path, split: str, dest: Path) -> int:
    """Copy one finished split (manifest + audio) to ``dest`` in the corpus layout: the shipped
    calibration set is the recipe's ``calib`` split, copied this way. Returns the utterance count."""
    import shutil  # noqa: PLC0415

    out, dest = Path(out), Path(dest)
    records = read_manifest(out, split, repair=False)
    if not records:
        raise SystemExit(f"{out / (split + '.jsonl')} holds no utterances: build the {split} split first")
    (dest / "audio" / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for uid in sorted(records):
        rec = records[uid]
        shutil.copyfile(out / rec["path"], dest / rec["path"])
        lines.append(json.dumps(rec) + "\n")
    (dest / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return len(lines)


def check(out: Path) -> dict[str, dict]:
    """Counts and hours per split (read-only)."""
    out = Path(out)
    result = {}
    for split in SPLITS:
        recs = read_manifest(out, split, repair=False)
        voices_count: dict[str, int] = {}
        for r in recs.values():
            voices_count[r["voice"]] = voices_count.get(r["voice"], 0) + 1
        result[split] = {
            "utterances": len(recs),
            "hours": sum(r["seconds"] for r in recs.values()) / 3600.0,
            "augmented": sum(1 for r in recs.values() if r["params"].get("augment")),
            "voices": dict(sorted(voices_count.items())),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastslm.models.demo.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-utterances", type=int, default=DEFAULT_TRAIN_UTTERANCES)
    p.add_argument("--jobs", type=int, default=1, help="synthesis worker processes (default 1)")
    p.add_argument("--mix", choices=sorted(MIXES), default=DEFAULT_MIX,
                   help="training voices and variation: wide (the recipe's) or shipped (the shipped model's corpus)")
    p.add_argument("--splits", nargs="*", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--check", action="store_true", help="print counts and hours per split and exit")
    p.add_argument("--ship-calibration", type=Path, metavar="DIR",
                   help="copy the finished calib split to DIR (the package's models/demo/calibration) and exit")
    a = p.parse_args(argv)
    if a.ship_calibration:
        n = ship_split(a.out, "calib", a.ship_calibration)
        print(f"calib: {n} utterances -> {a.ship_calibration}", file=sys.stderr)
        return 0
    if a.check:
        for split, r in check(a.out).items():
            print(f"{split:12s} {r['utterances']:6d} utterances  {r['hours']:7.3f} h  "
                  f"augmented {r['augmented']:6d}  voices {r['voices']}")
        return 0
    try:
        build(a.out, a.seed, a.train_utterances, a.jobs, splits=a.splits, mix=a.mix)
    except texts.MissingTextSources as exc:
        print(f"fastslm.models.demo.corpus: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
