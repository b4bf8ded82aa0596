"""Checkpoints: atomic saves, clear load errors, exact resume (in-process and after SIGKILL)."""

from __future__ import annotations

import importlib.util
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state

SCRIPT = Path(__file__).resolve().parents[1] / "_scripts" / "resume_run.py"
ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("resume_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values()])


def test_save_load_roundtrip_and_no_temp_files(tmp_path):
    state = {"a": torch.arange(5.0), "b": {"c": [1, 2.5, None, "x"], "d": (3, 4)}}
    save_checkpoint(state, tmp_path / "sub" / "x.pt")
    out = load_checkpoint(tmp_path / "sub" / "x.pt")
    assert torch.equal(out["a"], state["a"]) and out["b"]["c"] == [1, 2.5, None, "x"]
    assert os.listdir(tmp_path / "sub") == ["x.pt"]


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_checkpoint({"v": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, fh, *a, **k):  # write half a file, then die as a crash mid-save would
        real_save(obj, fh, *a, **k)
        fh.truncate(10)
        raise OSError("disk on fire")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["x.pt"]


def test_truncated_foreign_and_missing_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"v": torch.ones(1000)}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt.*truncated, corrupt"):
        load_checkpoint(trunc)
    foreign = tmp_path / "foreign.pt"
    torch.save({"obj": pytest.approx(1.0)}, foreign)  # an arbitrary pickled object: refused by weights_only
    with pytest.raises(CheckpointError, match=r"foreign\.pt"):
        load_checkpoint(foreign)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"v": 1}, protocol=2))
    with pytest.raises(CheckpointError, match=r"raw\.pkl"):
        load_checkpoint(raw)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt.*empty"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match=r"nope\.pt.*does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"good\.pt.*not a 'bilevel.trainer/1' checkpoint"):
        load_checkpoint(good, expect_format="bilevel.trainer/1")
    save_checkpoint([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_rng_state_roundtrip_through_a_file(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    expect = (torch.rand(3), np.random.randn(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_in_process_resume_mid_epoch_is_exact(tmp_path):
    mod = _load_script()
    ref, inner, outer = mod.build()
    ref.fit(inner, outer, epochs=100, max_steps=12, progress=False)
    ref_params = _flat(ref.model.state_dict())

    a, inner, outer = mod.build()
    a.fit(inner, outer, epochs=100, max_steps=9, progress=False, checkpoint_path=tmp_path / "c.pt")  # mid epoch 2
    torch.rand(5)  # disturb the RNG between the runs
    b, inner, outer = mod.build()
    b.fit(inner, outer, epochs=100, max_steps=12, progress=False, checkpoint_path=tmp_path / "c.pt", resume=True)
    assert b.step_count == 12 and b.hyper_steps == ref.hyper_steps
    torch.testing.assert_close(_flat(b.model.state_dict()), ref_params, rtol=0, atol=0)
    torch.testing.assert_close(_flat(b.meta_model.state_dict()), _flat(ref.meta_model.state_dict()), rtol=0, atol=0)
    assert b.scheduler.state_dict() == ref.scheduler.state_dict()


def test_load_into_a_mismatched_trainer_is_refused(tmp_path):
    mod = _load_script()
    a, inner, outer = mod.build()
    a.fit(inner, outer, max_steps=2, progress=False, checkpoint_path=tmp_path / "c.pt")
    b, _, _ = mod.build()
    b.scheduler = None
    with pytest.raises(ValueError, match="scheduler"):
        b.load_checkpoint(tmp_path / "c.pt")


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 20
    mod = _load_script()
    ref, inner, outer = mod.build()
    ref.fit(inner, outer, epochs=100, max_steps=steps, progress=False)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpt, out = tmp_path / "run.pt", tmp_path / "final.pt"
    rng = random.Random()
    kill_at, delay = rng.randint(2, steps - 3), rng.uniform(0.0, 0.08)  # may land inside a save
    cmd = [sys.executable, str(SCRIPT), str(ckpt), str(out), str(steps), "0.05"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = 0
    for line in proc.stdout:
        seen = int(line.split()[1])
        if seen >= kill_at:
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill (kill_at={kill_at}, seen={seen})"
    assert not out.exists()
    resumed = subprocess.run(cmd[:-1], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    first = int(resumed.stdout.split()[1])
    assert kill_at <= first <= kill_at + 2, (kill_at, first)  # it went on from the last checkpoint
    final = load_checkpoint(out)
    diff = (_flat(final["model"]) - _flat(ref.model.state_dict())).abs().max()
    mdiff = (_flat(final["meta"]) - _flat(ref.meta_model.state_dict())).abs().max()
    assert diff <= 1e-12 and mdiff <= 1e-12, (kill_at, delay, float(diff), float(mdiff))


def test_restart_streams_drops_restored_positions(tmp_path):
    """restart_streams removes the restored position of the named streams only; unknown names raise."""
    import bilevel as bl

    model = torch.nn.Linear(2, 1)
    trainer = bl.BilevelTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        bl.single_task_objective(lambda p, b: (p["weight"] ** 2).sum()),
    )
    batches = [torch.zeros(1)] * 4
    trainer.fit(batches, max_steps=2, checkpoint_path=tmp_path / "c.pt", progress=False)
    trainer.load_checkpoint(tmp_path / "c.pt")
    assert set(trainer._pending["cursors"]) == {"inner"}
    trainer.restart_streams("outer", "hvp")  # not there: a no-op
    assert set(trainer._pending["cursors"]) == {"inner"}
    trainer.restart_streams("inner")
    assert trainer._pending["cursors"] == {}
    with pytest.raises(ValueError, match="unknown stream"):
        trainer.restart_streams("meta")


def test_a_bit_flipped_checkpoint_is_refused(tmp_path):
    import zipfile

    path = save_checkpoint({"w": torch.ones(64)}, tmp_path / "c.pt")
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    raw = bytearray(path.read_bytes())
    h = info.header_offset  # the local header: 30 bytes, then the name and the extra field (torch's alignment)
    name_len, extra_len = int.from_bytes(raw[h + 26 : h + 28], "little"), int.from_bytes(raw[h + 28 : h + 30], "little")
    raw[h + 30 + name_len + extra_len + 5] ^= 0x10  # one bit of the tensor data
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["w"][1] != 1  # torch itself loads the altered value
    with pytest.raises(CheckpointError, match=r"c\.pt.*fails its CRC-32 check"):
        load_checkpoint(path)


def test_a_failed_load_changes_nothing(tmp_path):
    mod = _load_script()
    a, inner, outer = mod.build()
    a.fit(inner, outer, max_steps=2, progress=False, checkpoint_path=tmp_path / "c.pt")
    b, _, _ = mod.build()
    b.fit(inner, outer, max_steps=1, progress=False)
    weights = {k: v.clone() for k, v in b.model.state_dict().items()}
    counters = b._counters()
    state = load_checkpoint(tmp_path / "c.pt")
    state["optimizer"] = torch.optim.SGD(b.model.parameters(), lr=0.1).state_dict()  # another optimizer's state
    state["optimizer"]["state"] = {0: {"momentum_buffer": None}}
    with pytest.raises(ValueError, match="nothing was changed"):
        b.load_state_dict(state)
    assert all(torch.equal(weights[k], v) for k, v in b.model.state_dict().items()) and b._counters() == counters
    with pytest.raises(ValueError, match=r"lacks \['scheduler'"):
        b.load_state_dict({k: v for k, v in state.items() if k != "scheduler"})


def test_fit_arguments_are_checked_before_any_step(tmp_path):
    mod = _load_script()
    a, inner, outer = mod.build()
    for kwargs, msg in (
        ({"epochs": -1}, "epochs must be an int >= 0"),
        ({"max_steps": -3}, "max_steps must be None or an int >= 1"),
        ({"log_every": 0}, "log_every must be an int >= 1"),
        ({"resume": True}, "resume=True needs a checkpoint_path"),
        ({"checkpoint_path": tmp_path}, "is a directory"),
    ):
        with pytest.raises(ValueError, match=msg):
            a.fit(inner, outer, progress=False, **kwargs)
    assert a.step_count == 0


def test_resume_with_another_configuration_is_refused(tmp_path):
    import dataclasses

    import bilevel as bl

    mod = _load_script()
    a, inner, outer = mod.build()
    a.fit(inner, outer, max_steps=2, progress=False, checkpoint_path=tmp_path / "c.pt")
    b, _, _ = mod.build()
    b.config = dataclasses.replace(b.config, hyper_every=5)
    b.solver = bl.get_solver("stocbio", iters=4, alpha=0.1)
    weights = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"config\.hyper_every: 2 in the checkpoint, 5 now; solver\.iters: 3"):
        b.load_checkpoint(tmp_path / "c.pt")
    assert all(torch.equal(weights[k], v) for k, v in b.model.state_dict().items())
    changes = b.load_checkpoint(tmp_path / "c.pt", allow_changes=True)
    assert len(changes) == 2 and b.resumed_with_changes == changes and b.step_count == 2
