"""Fuzzing with hypothesis: whatever a hostile user feeds fastslm ends in a result or in one
`FastSLMError` line, never an uncaught exception, a numpy warning or a hang.

Targets: the audio loader (random bytes, damaged WAV headers, arrays of every dtype and layout,
any rate), the bundle loader (mutated manifests, configs, tables and graphs of the shipped demo
bundle), the prompt and tokenizer (arbitrary unicode and bytes), and each CLI's options. About
1,400 generated cases in all; each example is small, so the file runs in well under a minute on
two cores (the one real pipeline, the demo model's, is loaded once).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import struct
import unicodedata
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from fastslm.runtime import audio  # noqa: E402
from fastslm.runtime.bundle import load_bundle, sha256_file  # noqa: E402
from fastslm.runtime.errors import AudioWarning, FastSLMError  # noqa: E402
from fastslm.runtime.generate import Pipeline  # noqa: E402
from fastslm.runtime.loading import DEFAULT_MODEL_DIR  # noqa: E402
from fastslm.runtime.prompt import PromptIds  # noqa: E402
from fastslm.runtime.tokenizer import StreamDecoder  # noqa: E402

FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
EXAMPLE_SECONDS = 20  # any single example past this is a hang


@contextlib.contextmanager
def no_hang(seconds: int = EXAMPLE_SECONDS):
    def alarm(signum, frame):
        raise TimeoutError(f"the example ran past {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(exc: FastSLMError) -> None:
    message = str(exc)
    assert message and "\n" not in message and message == message.strip(), repr(message)


# What each target's examples ended in, e.g. {"audio_arrays": {"ok": 31, "AudioError": 169}}; written to
# $FASTSLM_FUZZ_TALLY (a JSON file) when set, for the record of what the fuzzing covered.
TALLY: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    yield
    target = os.environ.get("FASTSLM_FUZZ_TALLY")
    if target:
        Path(target).write_text(json.dumps({k: dict(v) for k, v in sorted(TALLY.items())}, indent=1) + "\n")


def _target() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0].removeprefix("test_fuzz_")


@contextlib.contextmanager
def refused_in_one_line_or_fine():
    """The body may succeed or raise a FastSLMError with a one-line message; numpy warnings are bugs."""
    with no_hang(), warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", AudioWarning)  # a cut-short WAV is read, and said so
        try:
            yield
        except FastSLMError as exc:
            one_line(exc)
            TALLY[_target()][type(exc).__name__] += 1
        else:
            TALLY[_target()]["ok"] += 1


# ---- the audio loader ------------------------------------------------------------------------


def _check_samples(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.ndim == 1 and x.size > 0 and np.isfinite(x).all()


SUFFIXES = [".wav", ".flac", ".ogg", ".mp3", ".aiff", ".raw", ""]


@settings(max_examples=100, **FUZZ)
@given(data=st.binary(max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_fuzz_audio_random_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"input{suffix}"
    path.write_bytes(data)
    with refused_in_one_line_or_fine():
        _check_samples(audio.load_audio(path))


def _wav_bytes(seconds: float, rate: int, channels: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    n = max(1, int(seconds * rate))
    sf.write(buf, 0.1 * np.sin(np.linspace(0, 200, n * channels)).reshape(n, channels), rate, subtype=subtype, format="WAV")
    return buf.getvalue()


HEADER_FIELDS = {  # offset, struct format of the canonical 44-byte header's fields
    "riff_size": (4, "<I"), "fmt_size": (16, "<I"), "format": (20, "<H"), "channels": (22, "<H"),
    "rate": (24, "<I"), "byte_rate": (28, "<I"), "block_align": (32, "<H"), "bits": (34, "<H"), "data_size": (40, "<I"),
}  # fmt: skip


@settings(max_examples=120, **FUZZ)
@given(
    rate=st.sampled_from([8000, 16000, 44100]),
    channels=st.integers(1, 3),
    subtype=st.sampled_from(["PCM_16", "PCM_U8", "FLOAT", "PCM_24"]),
    field=st.sampled_from(sorted(HEADER_FIELDS)),
    value=st.one_of(st.integers(0, 2**16 - 1), st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 999, 384_001])),
    flips=st.lists(st.tuples(st.integers(0, 43), st.integers(0, 255)), max_size=3),
    keep=st.floats(0.0, 1.0),
)
def test_fuzz_audio_wav_headers(tmp_path_factory, rate, channels, subtype, field, value, flips, keep):
    data = bytearray(_wav_bytes(0.2, rate, channels, subtype))
    offset, fmt = HEADER_FIELDS[field]
    struct.pack_into(fmt, data, offset, value % (1 << (8 * struct.calcsize(fmt))))
    for at, byte in flips:
        data[at] = byte
    path = tmp_path_factory.mktemp("wav") / "input.wav"
    path.write_bytes(bytes(data[: int(len(data) * keep)]))
    with refused_in_one_line_or_fine():
        _check_samples(audio.load_audio(path))


DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
          "float64", "bool", "complex64"]  # fmt: skip


@settings(max_examples=200, **FUZZ)
@given(
    array=st.sampled_from(DTYPES).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
    ),
    rate=st.one_of(
        st.sampled_from([16000, 8000, 44100, 48000, 1000, 384_000]),
        st.integers(-10**6, 10**7),
        st.floats(allow_nan=True, allow_infinity=True),
        st.none(),
    ),
)
def test_fuzz_audio_arrays(array, rate):
    with refused_in_one_line_or_fine():
        _check_samples(audio.load_audio(array, sample_rate=rate))


@settings(max_examples=60, **FUZZ)
@given(source=st.one_of(st.integers(), st.floats(), st.text(max_size=20), st.lists(st.floats(), max_size=5), st.none(),
                        st.binary(max_size=8)))  # fmt: skip
def test_fuzz_audio_other_sources(tmp_path_factory, source):
    if isinstance(source, str):
        source = str(tmp_path_factory.mktemp("src") / source.replace("/", "_").replace("\x00", "_")) if source else ""
    with refused_in_one_line_or_fine():
        _check_samples(audio.load_audio(source))


# ---- the bundle loader -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-bundle") / "bundle"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    return folder


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys, list indices), the value itself first."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _mutate(doc, path, action, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _json_mutation(original: dict):
    paths = list(_paths(original))
    return st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "delete"]), JSON_VALUES).filter(
        lambda t: t[0] or t[1] == "replace"
    )


MANIFEST = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
CONFIG = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())


@contextlib.contextmanager
def restored(folder: Path, *names: str):
    saved = {n: (folder / n).read_bytes() for n in names}
    try:
        yield
    finally:
        for n, data in saved.items():
            (folder / n).write_bytes(data)


def _relist(folder: Path, manifest: dict, name: str) -> None:
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        manifest["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}


@settings(max_examples=200, **FUZZ)
@given(mutation=_json_mutation(MANIFEST), verify=st.booleans())
def test_fuzz_bundle_manifest(bundle_copy, mutation, verify):
    with restored(bundle_copy, "manifest.json"):
        (bundle_copy / "manifest.json").write_text(json.dumps(_mutate(MANIFEST, *mutation)))
        with refused_in_one_line_or_fine():
            load_bundle(bundle_copy, runtime="onnx", verify=verify)


@settings(max_examples=120, **FUZZ)
@given(mutation=_json_mutation(CONFIG), relist=st.booleans())
def test_fuzz_bundle_config(bundle_copy, mutation, relist):
    def write(path: Path) -> None:
        path.write_text(json.dumps(_mutate(CONFIG, *mutation)))

    _load_with_replaced_file(bundle_copy, "config.json", write, relist)


def _load_with_replaced_file(bundle: Path, name: str, write, relist: bool) -> None:
    """Replace one bundle file (`write(path)`), re-hash it into the manifest or not, and load the bundle."""
    with restored(bundle, "manifest.json", name):
        write(bundle / name)
        manifest = copy.deepcopy(MANIFEST)
        if relist:  # a careful forger re-hashes what they changed
            _relist(bundle, manifest, name)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        with refused_in_one_line_or_fine():
            load_bundle(bundle, runtime="onnx", verify=False)


@settings(max_examples=80, **FUZZ)
@given(
    table=st.one_of(
        hnp.arrays(st.sampled_from(["float16", "float32", "int64"]), hnp.array_shapes(min_dims=0, max_dims=3, max_side=300)),
        st.binary(max_size=300).map(bytes),
    ),
    relist=st.booleans(),
)
def test_fuzz_bundle_embedding_table(bundle_copy, table, relist):
    def write(path: Path) -> None:
        if isinstance(table, bytes):
            path.write_bytes(table)
        else:
            with open(path, "wb") as f:  # np.save(path) would add ".npy" to a name without it
                np.save(f, table)

    _load_with_replaced_file(bundle_copy, "embed_tokens.npy", write, relist)


@settings(max_examples=12, **FUZZ)
@given(
    graph=st.sampled_from(["audio_tower.onnx", "llm.onnx", "tokenizer.json"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_fuzz_bundle_graphs_and_tokenizer(bundle_copy, graph, cut, flips):
    """A damaged file that the manifest vouches for: onnxruntime or tokenizers must refuse it in one line."""
    from fastslm.runtime.loading import load_pipeline

    with restored(bundle_copy, "manifest.json", graph):
        data = bytearray((bundle_copy / graph).read_bytes())
        for where, byte in flips:
            data[int(where * (len(data) - 1))] = byte
        (bundle_copy / graph).write_bytes(bytes(data[: max(1, int(len(data) * cut))]))
        manifest = copy.deepcopy(MANIFEST)
        _relist(bundle_copy, manifest, graph)
        (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
        with refused_in_one_line_or_fine():
            load_pipeline(bundle_copy, "onnx", verify=False)


# ---- the prompt and tokenizer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.load(DEFAULT_MODEL_DIR)


ANY_TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=80),  # surrogates included
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),  # argv bytes, as Python sees them
    st.text(max_size=30).map(lambda t: t + "<|AUDIO|>"),
    st.sampled_from(["<|im_end|>", "<|ASR|> hi", "transcribe", "translate to korean", "", "   ", "\x00"]),
)


@settings(max_examples=200, **FUZZ)
@given(prompt=st.one_of(ANY_TEXT, st.binary(max_size=10), st.integers(), st.none()), language=st.one_of(
    st.none(), st.sampled_from(["en", "KO", "korean"]), ANY_TEXT, st.integers()))  # fmt: skip
def test_fuzz_prompt(demo, prompt, language):
    with refused_in_one_line_or_fine():
        ids = demo.prompt_ids(prompt, language)
        assert isinstance(ids, PromptIds) and len(ids) > 0
        demo.check_context(5.0, prompt, language, 32)


@settings(max_examples=150, **FUZZ)
@given(text=ANY_TEXT)
def test_fuzz_tokenizer_round_trip_and_streaming(demo, text):
    tok = demo.tokenizer
    with refused_in_one_line_or_fine():
        ids = tok.encode(text)
        decoded = tok.decode(ids)
        if not any(marker in text for marker in ("<|", "<think>", "</think>")):
            assert decoded == unicodedata.normalize("NFC", text)
        stream = StreamDecoder(tok)
        pieces = "".join(stream.add(i) for i in ids) + stream.flush()
        assert pieces == decoded


@settings(max_examples=80, **FUZZ)
@given(ids=st.lists(st.integers(-5, 2100), max_size=30))
def test_fuzz_tokenizer_decodes_any_ids(demo, ids):
    with refused_in_one_line_or_fine():
        text = demo.tokenizer.decode(ids)
        assert isinstance(text, str)


# ---- each CLI's options ----------------------------------------------------------------------


def _run_cli(main_module: str, app_name: str, tool: str, args: list[str]) -> tuple[int, str]:
    import importlib

    from fastslm.runtime.errors import run_cli

    app = getattr(importlib.import_module(main_module), app_name)
    err, out = io.StringIO(), io.StringIO()
    with no_hang(60), warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", AudioWarning)
        try:
            run_cli(app, tool, args)
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    raise AssertionError("run_cli returned without exiting")


def _assert_clean(code: int, stderr: str, tool: str) -> None:
    assert "Traceback" not in stderr, stderr
    TALLY[_target()][f"exit {code}"] += 1
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(f"{tool}: model ")]
    if code == 0:
        return
    assert code in (2, 130), (code, stderr)
    errors = [line for line in lines if line.startswith(f"{tool}: error: ")]
    assert errors and all(line.startswith(f"{tool}: ") for line in lines), stderr


NUMBERS = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1e-320", "1e309", "nan", "inf", "abc", "", "0x10", "1_000"]),
)
WORDS = st.one_of(st.text(max_size=12), st.sampled_from(["onnx", "torch", "tensorrt", "auto", "cpu", "cuda", "en", "xx"]))


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, demo) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    sf.write(root / "short.wav", 0.1 * np.sin(np.arange(4000) / 5.0), 8000)
    (root / "notes.wav").write_text("not audio")
    (root / "a-file").write_text("x")
    (root / "empty").mkdir()
    return {"short": root / "short.wav", "notes": root / "notes.wav", "file": root / "a-file",
            "empty": root / "empty", "missing": root / "missing", "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def loaded_once(demo):
    """fastslm-run opens the demo bundle once for all examples: the options are what is fuzzed."""
    real = Pipeline.load.__func__

    def load(cls, model=None, backend="auto", *args, **options):
        if model is None and backend in ("auto", "onnx") and args in ((), ("auto",)) and not options.get("providers"):
            return demo
        return real(cls, model, backend, *args, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pipeline, "load", classmethod(load))
        yield


def _option_list(options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        args += [name] if value is True else [name, value]
    return args


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzz_cli_run(cli_files, loaded_once, data):
    audio_files = data.draw(st.lists(st.sampled_from(["short", "notes", "missing", "empty"]), min_size=1, max_size=2))
    options = data.draw(st.fixed_dictionaries({}, optional={
        "--prompt": ANY_TEXT.filter(lambda t: "\x00" not in t), "--max-new-tokens": NUMBERS, "--temperature": NUMBERS,
        "--top-k": NUMBERS, "--top-p": NUMBERS, "--seed": NUMBERS, "--language": WORDS, "--backend": WORDS,
        "--providers": WORDS, "--json": st.just(True),
    }))  # fmt: skip
    if "--max-new-tokens" not in options:
        options["--max-new-tokens"] = "4"
    args = _option_list(options) + ["--"] + [str(cli_files[a]) for a in audio_files]
    code, stderr = _run_cli("fastslm.runtime.cli", "app", "fastslm-run", args)
    _assert_clean(code, stderr, "fastslm-run")


def _model_choice(cli_files):
    return st.sampled_from([cli_files["missing"], cli_files["file"], cli_files["empty"], cli_files["root"]]).map(str)


@settings(max_examples=50, **FUZZ)
@given(data=st.data())
def test_fuzz_cli_export(cli_files, data):
    options = data.draw(st.fixed_dictionaries({"--model": _model_choice(cli_files)}, optional={
        "--target": WORDS | st.sampled_from(["onnx-int8", "trt-fp16", "onnx-fp16"]), "--force": st.just(True),
        "--trt-max-context": NUMBERS, "--trt-max-windows": NUMBERS, "--trt-prefill-chunk": NUMBERS,
        "--trt-opt-level": NUMBERS, "--percentile": NUMBERS, "--range-method": WORDS, "--llm-bits": NUMBERS,
        "--block-size": NUMBERS, "--wer-items": NUMBERS, "--target-cosine": NUMBERS, "--calibration": WORDS,
        "--gate-beam": NUMBERS,
    }))  # fmt: skip
    out = data.draw(st.sampled_from(["new", "file", "proc", "root"]))
    options["--out"] = {"new": str(cli_files["root"] / "out-new"), "file": str(cli_files["file"]),
                        "proc": "/proc/fastslm-fuzz", "root": str(cli_files["root"])}[out]  # fmt: skip
    code, stderr = _run_cli("fastslm.export.cli", "app", "fastslm-export", _option_list(options))
    _assert_clean(code, stderr, "fastslm-export")
    assert code != 0  # no model to export: every example must be refused
    assert not (cli_files["root"] / "out-new").exists()


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzz_cli_convert(cli_files, data):
    options = data.draw(st.fixed_dictionaries({
        "--checkpoint": _model_choice(cli_files), "--qwen": _model_choice(cli_files),
        "--out": st.sampled_from([str(cli_files["root"] / "conv-new"), str(cli_files["file"]), "/proc/fastslm-fuzz"]),
    }, optional={"--dtype": WORDS, "--lora-r": NUMBERS, "--lora-alpha": NUMBERS, "--force": st.just(True),
                 "--whisper": _model_choice(cli_files)}))  # fmt: skip
    pytest.importorskip("torch")
    code, stderr = _run_cli("fastslm.models.convert", "app", "fastslm-convert", _option_list(options))
    _assert_clean(code, stderr, "fastslm-convert")
    assert code != 0 and not (cli_files["root"] / "conv-new").exists()


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzz_cli_calibrate(cli_files, data):
    options = data.draw(st.fixed_dictionaries({
        "--model": _model_choice(cli_files),
        "--out": st.sampled_from([str(cli_files["root"] / "calib-new"), str(cli_files["file"]), "/proc/fastslm-fuzz"]),
    }, optional={"--max-windows": NUMBERS, "--percentile": NUMBERS, "--force": st.just(True),
                 "--audio": st.sampled_from([str(cli_files[k]) for k in ("short", "notes", "missing", "empty")])}))  # fmt: skip
    code, stderr = _run_cli("fastslm.calibration.cli", "app", "fastslm-calibrate", _option_list(options))
    _assert_clean(code, stderr, "fastslm-calibrate")
    assert code != 0 and not (cli_files["root"] / "calib-new").exists()
