"""Done records (commands.study.records): a unit is done only while the files it recorded when it
finished still have the SHA-256 it recorded, and while the units it read are unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from commands.study.plan import Unit
from commands.study.records import RECORD, record_problem, set_aside_unverified, status, write_record


def make_unit(root: Path, kind: str, label: str, deps: list[str] | None = None, **files: bytes) -> Unit:
    unit = Unit(kind, "evaluate", label, {"label": label}, deps=deps or [], root=root)
    unit.folder.mkdir(parents=True)
    for name, data in files.items():
        (unit.folder / name).write_bytes(data)
    return unit


def test_record_holds_each_file_with_its_sha256(tmp_path):
    unit = make_unit(tmp_path, "bpd", "a", **{"result.json": b'{"bpd_elbo": 1.5}'})
    assert status(unit) == "invalid" and record_problem(unit) == "no record of its outputs"  # not done
    write_record(unit, [unit.folder / "result.json"])
    record = json.loads((unit.folder / RECORD).read_text())
    assert record["files"] == {"result.json": hashlib.sha256(b'{"bpd_elbo": 1.5}').hexdigest()}
    assert status(unit) == "done" and record_problem(unit) is None


def test_a_deleted_or_changed_output_makes_the_unit_run_again(tmp_path):
    unit = make_unit(tmp_path, "sample", "a", **{"result.json": b"{}", "samples.npz": b"x" * 100})
    write_record(unit, [unit.folder / "result.json", unit.folder / "samples.npz"])
    (unit.folder / "samples.npz").unlink()
    assert status(unit) == "invalid" and record_problem(unit) == "samples.npz is missing"
    (unit.folder / "samples.npz").write_bytes(b"x" * 100)
    assert status(unit) == "done"
    (unit.folder / "result.json").write_text("{garbage")
    assert status(unit) == "invalid" and record_problem(unit).startswith("result.json differs from what the unit wrote")
    (unit.folder / RECORD).write_text("[1, 2")
    assert status(unit) == "invalid" and record_problem(unit) == f"{RECORD} is unreadable"


def test_a_unit_whose_input_changed_runs_again(tmp_path):
    score = make_unit(tmp_path, "aux", "p", **{"prior.ckpt": b"weights"})
    write_record(score, [score.folder / "prior.ckpt"])
    sample = make_unit(tmp_path, "sample", "s", deps=[score.id], **{"result.json": b"{}"})
    write_record(sample, [sample.folder / "result.json"])
    assert status(sample) == "done"
    (score.folder / "prior.ckpt").write_bytes(b"other weights")
    assert status(score) == "invalid" and status(sample) == "done"  # the prior runs again first
    write_record(score, [score.folder / "prior.ckpt"])  # ... and records what it wrote
    assert status(sample) == "invalid"
    assert record_problem(sample) == f"{score.id}, which it read, has changed since it ran"


def test_set_aside_moves_only_the_files_that_do_not_verify(tmp_path):
    unit = make_unit(tmp_path, "score", "f", **{"config.yaml": b"a: 1\n", "last.ckpt": b"ckpt"})
    write_record(unit, [unit.folder / "config.yaml", unit.folder / "last.ckpt"])
    (unit.folder / "config.yaml").write_text("a: 2\n")
    assert set_aside_unverified(unit) == ["config.yaml"]
    assert (unit.folder / "config.yaml.invalid").read_text() == "a: 2\n"
    assert not (unit.folder / "config.yaml").exists() and (unit.folder / "last.ckpt").read_bytes() == b"ckpt"
    assert not (unit.folder / RECORD).exists()
