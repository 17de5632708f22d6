"""Fuzzing the training config: TOML files, `--set key=value`, the `fastsr train` command line.

Whatever the input (random or corrupt TOML, wrong types, unknown keys, out-of-range values,
random --set strings), the outcome is a valid TrainConfig that holds every given value, or
a ConfigError: one line naming the file or the key. Never another exception (on the
command line: a traceback), never a key or a part of a value silently dropped. A valid
config written out (config.toml of every run) reads back equal.
"""
import contextlib
import dataclasses
import io
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastsr.cli import main as cli_main
from fastsr.models.edsr import PRESETS
from fastsr.train import ConfigError, TrainConfig, load_config
from fastsr.train.config import _field_types, _toml_value

REPO = Path(__file__).resolve().parents[2]
TYPES = _field_types()
KEYS = list(TYPES)
I64 = 2**63 - 1

# Text TOML can hold: no lone surrogates (not Unicode scalar values), no NUL (rejected: paths).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)

# A strategy of valid values for every key (the ranges TrainConfig.validate documents).
CHOICES = {
    "model": list(PRESETS), "scale": [2, 3, 4], "amp": ["", "bf16", "fp16"], "backend": ["", "triton", "cpu", "reference"],
    "loader": ["device", "dataloader"], "nan_policy": ["stop", "skip"],
    "val_protocol": ["paper", "official", "div2k"], "recompute": ["auto", "true", "false"],
}
POSITIVE = ("patch_size", "batch_size", "steps", "lr_step", "log_every", "ckpt_every", "nan_max_consecutive")
UNIT = ("beta1", "beta2", "ema_decay")            # [0, 1)
NONNEG_FLOAT = ("res_scale", "weight_decay", "grad_clip")
POS_FLOAT = ("lr", "lr_gamma", "eps")


def valid_values(key: str) -> st.SearchStrategy:
    kind = TYPES[key]
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if key == "device":
        return st.one_of(st.sampled_from(["auto", "cpu", "cuda"]), st.integers(0, 99).map(lambda i: f"cuda:{i}"))
    if key in ("threads", "num_workers"):
        return st.integers(0, 1024)
    if kind is int:
        return st.integers(1 if key in POSITIVE else 0, I64)
    if key in UNIT:
        return st.floats(0, 1, exclude_max=True)
    if key in NONNEG_FLOAT:
        return st.floats(0, 1e300)
    if kind is float:
        return st.floats(0, 1e10 if key == "lr" else 1e300, exclude_min=True)
    if kind is bool:
        return st.booleans()
    return TEXT


VALID_CONFIGS = st.fixed_dictionaries({}, optional={k: valid_values(k) for k in KEYS})

# Any TOML value, of any type: scalars, special floats, big integers, dates, arrays, tables.
TOML_VALUES = st.recursive(
    st.one_of(st.integers(-2**70, 2**70), st.floats(), st.booleans(), TEXT, st.dates(), st.datetimes()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True),
                                                                         inner, max_size=2)),
    max_leaves=4,
)
ANY_KEY = st.one_of(st.sampled_from(KEYS), st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,14}", fullmatch=True))


def toml_value(v) -> str:
    """TOML text of a value (strings and scalars through train's own writer)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return _toml_value(v)


def toml_doc(d: dict) -> str:
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in d.items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


def outcome(fn) -> TrainConfig | ConfigError:
    """fn()'s TrainConfig, or its ConfigError after checking the message is one clean line."""
    try:
        return fn()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        assert len(msg) < 2000, "a runaway message"
        return e


def assert_holds(cfg: TrainConfig, given: dict) -> None:
    """Every given key is in the config with the given value (none silently dropped)."""
    for k, v in given.items():
        got = getattr(cfg, k)
        if k == "amp":
            assert got == ("" if v.lower() in ("", "none", "fp32", "float32") else v.lower())
        elif TYPES[k] is str:
            assert got == v, k
        else:
            assert got == v and type(got) is TYPES[k], (k, got, v)


# ---------------------------------------------------------------------------------------
# Valid configs: accepted, held exactly, and written out so they read back equal
# ---------------------------------------------------------------------------------------


@given(VALID_CONFIGS)
@example({"name": "a\x7fb\U0001F600c\x01\"\\"})  # DEL, a non-BMP character, a control, quote, backslash
@example({"out_dir": "runs/x\ty", "lr": 5e-324, "seed": I64, "steps": 1})
def test_valid_configs_load_and_round_trip(folder, values):
    cfg = load_config(values=values)
    assert_holds(cfg, values)
    path = folder / "roundtrip.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(path) == cfg
    # The same values as --set overrides (strings quoted: kept verbatim, no TOML escapes).
    sets = [f'{k}="{v}"' if TYPES[k] is str else f"{k}={_toml_value(v)}" for k, v in values.items()]
    assert load_config(overrides=sets) == cfg


# ---------------------------------------------------------------------------------------
# Random documents, bytes and overrides: a config or a clear error
# ---------------------------------------------------------------------------------------


@given(st.dictionaries(ANY_KEY, st.one_of(TOML_VALUES, st.sampled_from(KEYS).flatmap(valid_values)), max_size=5))
@example({"steps": 2**70})
@example({"lr": 10**400 // 10**390})
@example({"seed": 1e30, "threads": 10**12})
@example({"device": "cuda:x"})
@example({"name": "a\x00b"})
@example({"nan_policy": "sometimes"})
def test_random_documents_give_a_config_or_name_the_file_or_key(folder, doc):
    path = folder / "random.toml"
    path.write_text(toml_doc(doc), encoding="utf-8")
    result = outcome(lambda: load_config(path))
    if isinstance(result, ConfigError):
        msg = str(result)
        assert str(path) in msg or any(repr(k) in msg for k in doc), msg
    else:
        assert set(doc) <= set(KEYS)
        assert_holds(result, {k: load_config(values={k: v}).__dict__[k] for k, v in doc.items()})


@given(st.one_of(st.binary(max_size=200), TEXT.map(lambda s: s.encode("utf-8", "surrogatepass"))))
@example(b"steps = 1\n\xff\xfe")                  # not UTF-8
@example(b"a = " + b"[" * 5000 + b"]" * 5000)     # nested too deeply for the parser
@example(b"steps = 1\nsteps = 2\n")               # a key twice
@example(b"[train]\nsteps = 1\n")                 # a table
@example(b"\xef\xbb\xbfsteps = 1\n")              # a UTF-8 byte order mark
def test_random_bytes_as_a_config_file(folder, data):
    path = folder / "bytes.toml"
    path.write_bytes(data)
    result = outcome(lambda: load_config(path))
    if isinstance(result, ConfigError):
        msg = str(result)
        assert str(path) in msg or "config key" in msg, msg


SET_TEXT = st.text(st.sampled_from("=\"' \n\t#[]{}.,-+_0123456789eE" + "abcdefghijklmnopqrstuvwxyz" + "\x00\udcff\u00e9"),
                   max_size=20)
SET_ITEMS = st.one_of(
    SET_TEXT,
    st.tuples(st.one_of(st.sampled_from(KEYS), SET_TEXT), SET_TEXT).map("=".join),
    st.sampled_from(KEYS).flatmap(lambda k: valid_values(k).map(lambda v: f"{k}={v}")),
)


@given(st.lists(SET_ITEMS, max_size=4))
@example(["lr=1e-3\nsteps=5"])       # two keys in one item: an error, not steps silently dropped
@example(["steps=1_000", "lr=.5"])
@example(["=5", "steps", "steps==5"])
@example(["name=\udcff"])            # a lone surrogate (argv bytes that are not UTF-8)
def test_random_set_overrides(overrides):
    result = outcome(lambda: load_config(overrides=overrides))
    if isinstance(result, ConfigError):
        msg = str(result)
        assert "--set" in msg or any(repr(item.split("=", 1)[0].strip()) in msg for item in overrides), msg
        return
    for item in overrides:  # each override is in the config: the last one of a key wins
        key = item.split("=", 1)[0].strip()
        last = [i for i in overrides if i.split("=", 1)[0].strip() == key][-1]
        assert getattr(result, key) == getattr(load_config(overrides=[last]), key)
    if any("\n" in item for item in overrides if TYPES[item.split("=", 1)[0].strip()] is not str):
        pytest.fail(f"a multi-line --set value of a non-string key was accepted: {overrides!r}")


def _bad_values(key: str) -> st.SearchStrategy:
    """Values of the wrong type or out of range for `key`."""
    kind = TYPES[key]
    # train_dir / val_images also take a TOML array of strings (an empty one is an empty list).
    list_key = key in ("train_dir", "val_images")
    wrong_type = st.one_of(st.lists(st.integers(), min_size=int(list_key), max_size=2),
                           st.dictionaries(TEXT, st.integers(), max_size=1))
    if kind is bool:
        return st.one_of(wrong_type, st.integers(2, 10), st.floats(), TEXT.filter(
            lambda s: s.lower() not in ("true", "false", "1", "0", "yes", "no")))
    if kind is str:
        if key in CHOICES or key == "device":
            ok = CHOICES.get(key, []) + ["auto", "cpu", "none", "fp32", "float32"]
            return st.one_of(wrong_type, st.integers(), TEXT.filter(lambda s: s.lower() not in ok and not (
                key == "device" and s.startswith("cuda"))))
        return st.one_of(wrong_type, st.integers(), st.booleans(), TEXT.map(lambda s: s + "\x00"))
    low = 1 if key in POSITIVE else 0
    if kind is int:
        high = 1024 if key in ("threads", "num_workers") else I64
        out = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1))
        if key == "scale":
            out = st.integers().filter(lambda i: i not in (2, 3, 4))
        return st.one_of(wrong_type, out, st.booleans(), st.floats().filter(lambda f: not float(f).is_integer()), TEXT)
    if key in UNIT:
        out = st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=1), st.just(math.nan))
    elif key in NONNEG_FLOAT:
        out = st.one_of(st.floats(max_value=0, exclude_max=True), st.sampled_from([math.inf, math.nan]))
    else:
        out = st.one_of(st.floats(max_value=0), st.sampled_from([math.inf, math.nan]), st.integers(max_value=0))
        if key == "lr":
            out = st.one_of(out, st.floats(min_value=1e10, exclude_min=True))
    return st.one_of(wrong_type, out, st.booleans(), TEXT, st.just(10**400))


@given(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _bad_values(k))))
def test_wrong_types_and_out_of_range_values_name_the_key(folder, key_value):
    key, value = key_value
    for load in (lambda: load_config(values={key: value}), lambda: TrainConfig(**{key: value}).validate()):
        result = outcome(load)
        assert isinstance(result, ConfigError), f"{key} = {value!r} was accepted"
        assert repr(key) in str(result), str(result)
    if not (isinstance(value, str) and "\x00" in value):  # what TOML can hold: also from a file
        path = folder / "bad.toml"
        path.write_text(toml_doc({key: value}), encoding="utf-8")
        result = outcome(lambda: load_config(path))
        assert isinstance(result, ConfigError) and repr(key) in str(result), (key, value, result)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


@given(st.one_of(st.binary(max_size=80), st.dictionaries(ANY_KEY, TOML_VALUES, max_size=3).map(
    lambda d: toml_doc(d).encode())), st.lists(SET_ITEMS, max_size=3))
def test_fastsr_train_command_line_never_shows_a_traceback(folder, data, overrides):
    path = folder / "cli.toml"
    path.write_bytes(data)
    argv = ["train", "-c", str(path), *[a for s in overrides for a in ("--set", s)], "--print-config"]
    code, out, err = run_cli(argv)
    assert "Traceback" not in err
    if code == 0:  # the resolved config, which reads back
        with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=folder, delete=False, encoding="utf-8") as f:
            f.write(out)
        assert dataclasses.asdict(load_config(f.name)) == dataclasses.asdict(load_config(path, overrides))
        os.unlink(f.name)
    elif code == 1:
        assert err.count("\n") == 1 and err.startswith("fastsr: error: "), err
    else:  # argparse: a --set value that looks like an option
        assert code == 2 and "usage:" in err and err.strip().splitlines()[-1].startswith("fastsr train: error:"), err


def test_a_corrupt_config_in_a_real_process_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'model = "edsr_baseline"\nsteps = 10\n\xff\xfe garbage')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fastsr", "train", "-c", str(bad)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"fastsr: error: {bad}: not a TOML file (not UTF-8 text: byte 0xff at offset 35)")
