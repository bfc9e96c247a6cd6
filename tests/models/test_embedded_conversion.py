"""The embedded model's one-time conversion: processes that start together convert once, a folder evolora did
not convert is never replaced, and an interrupted conversion leaves the cache usable."""

import threading
import time

import pytest

from evolora.errors import EvoloraError
from evolora.models import CONVERSION, EMBEDDED, STAGING_MARK, STAMP, embedded_model_dir

NAME = "smollm2-135m"


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """EVOLORA_CACHE in tmp_path and a conversion that writes a stand-in weights file slowly, counting calls."""
    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path))
    calls = []

    def convert(name, out):
        calls.append(name)
        time.sleep(0.3)  # long enough for a second caller to arrive while this one converts
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr("evolora.models._convert_embedded", convert)
    return tmp_path / EMBEDDED[NAME]["folder"], calls


def test_two_first_uses_at_once_convert_once_and_both_get_the_folder(fake_conversion):
    target, calls = fake_conversion
    got, errors = [], []

    def first_use():
        try:
            got.append(embedded_model_dir(NAME))
        except Exception as error:  # noqa: BLE001 - the test reports any failure of either caller
            errors.append(error)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and got == [target, target] and calls == [NAME]
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert (target / STAMP).read_text().strip() == CONVERSION and not (target / STAGING_MARK).exists()
    assert not list(target.parent.glob("*.partial"))


def test_a_folder_evolora_did_not_convert_is_left_alone(fake_conversion):
    target, calls = fake_conversion
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(EvoloraError, match=f"{target}: not a folder evolora converted"):
        embedded_model_dir(NAME)
    assert (target / "notes.txt").read_text() == "mine" and calls == []


def test_an_older_conversion_is_replaced_and_a_killed_ones_staging_removed(fake_conversion):
    target, calls = fake_conversion
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"old")
    (target / STAMP).write_text("1\n")
    killed = target.with_name(target.name + ".abc123.partial")
    killed.mkdir()
    (killed / STAGING_MARK).write_text("")
    someone_elses = target.with_name(target.name + ".keep.partial")
    someone_elses.mkdir()
    assert embedded_model_dir(NAME) == target and calls == [NAME]
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert not killed.exists() and someone_elses.is_dir()


def test_a_failed_conversion_leaves_no_staging_and_no_folder(fake_conversion, monkeypatch):
    target, _ = fake_conversion

    def broken(name, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise EvoloraError("model.name: conversion failed")

    monkeypatch.setattr("evolora.models._convert_embedded", broken)
    with pytest.raises(EvoloraError, match="conversion failed"):
        embedded_model_dir(NAME)
    assert not target.exists() and not list(target.parent.glob("*.partial"))
