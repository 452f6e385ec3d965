"""checkpoints.py: manifests checked before loading, atomic folders, no NaN checkpoints, a full disk reported with the
last intact checkpoint, user folders left alone, a half-written metrics line tolerated. Mostly on a tiny Llama and
AdamW directly (milliseconds); three tests run dpo.main for 2-3 steps."""
import errno
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from harness import checkpoints
import dpo
from harness.errors import CheckpointError
from tiny import make_model_dir, make_preference_dir, make_tokenizer, run_config


def tiny_state(seed=0, tie=False):
    """A 2-layer Llama, AdamW and a linear schedule, after one optimizer step (so the optimizer has state)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=26, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 10)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save(out, step, state, **kw):
    model, optimizer, scheduler = state
    return checkpoints.save_checkpoint(out, step, model, None, optimizer, scheduler, {"global_step": step}, **kw)


def load(path):
    model, optimizer, scheduler = tiny_state(seed=1)
    return checkpoints.load_checkpoint(path, model, None, optimizer, scheduler)


def test_manifest_lists_every_file_and_a_load_restores_everything(tmp_path):
    model, optimizer, scheduler = tiny_state()
    trainer_state = {"global_step": 3, "window": {"loss": [0.5, 0.25]}}
    path = checkpoints.save_checkpoint(tmp_path, 3, model, None, optimizer, scheduler, trainer_state)
    assert path == tmp_path / "checkpoint-3" and not list(tmp_path.glob(".tmp-*"))
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == ["optimizer.pt", "rng.safetensors", "trainable.safetensors", "trainer_state.json"]
    for name, entry in files.items():
        assert entry["size"] == (path / name).stat().st_size
        assert entry["sha256"] == checkpoints.sha256(path / name)
    fresh, fresh_opt, fresh_sched = tiny_state(seed=1)
    loaded = checkpoints.load_checkpoint(path, fresh, None, fresh_opt, fresh_sched)
    # the first checkpoint of its line
    assert loaded == {**trainer_state, "checkpoint_id": loaded["checkpoint_id"], "line": []}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh_sched.last_epoch == scheduler.last_epoch
    assert checkpoints.find_checkpoint(tmp_path, "latest") == path


def test_saving_a_step_again_replaces_its_checkpoint_whole(tmp_path):
    """Ctrl-C right after a save_steps checkpoint saves the same step again: the old folder is moved aside first."""
    model, optimizer, scheduler = state = tiny_state()
    save(tmp_path, 2, state)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    path = save(tmp_path, 2, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "line.json"]
    assert [e["step"] for e in checkpoints.read_line(tmp_path)] == [2]  # the new one replaces the old one
    fresh, fresh_optimizer, fresh_scheduler = tiny_state(seed=1)
    checkpoints.load_checkpoint(path, fresh, None, fresh_optimizer, fresh_scheduler)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_tied_reference_is_saved_and_restored_with_sync_ref_model(tmp_path):
    model, optimizer, scheduler = tiny_state()
    ref = tiny_state(seed=2, tie=True)[0]
    path = checkpoints.save_checkpoint(tmp_path, 1, model, ref, optimizer, scheduler, {"global_step": 1}, sync_ref_model=True)
    other_ref = tiny_state(seed=3, tie=True)[0]
    fresh, fresh_optimizer, fresh_scheduler = tiny_state(seed=4)
    checkpoints.load_checkpoint(path, fresh, other_ref, fresh_optimizer, fresh_scheduler)
    for (k, a), b in zip(ref.state_dict().items(), other_ref.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name, damage", [
    ("trainable.safetensors", lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:]),  # one flipped bit, same size
    ("optimizer.pt", lambda b: b[:len(b) // 2]),                                      # cut short
])
def test_a_damaged_file_is_named_with_the_earlier_checkpoints(tmp_path, name, damage):
    state = tiny_state()
    save(tmp_path, 1, state)
    path = save(tmp_path, 2, state)
    (path / name).write_bytes(damage((path / name).read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert f"{name} does not match its manifest" in message and "corrupted or partly written" in message
    assert f"in {path};" in message and f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in message
    assert "(intact: checkpoint-1)" in message


def test_user_folders_are_neither_picked_nor_pruned(tmp_path):
    for stray in ("checkpoint-best", "checkpoint-100-backup", ".tmp-checkpoint-9"):
        (tmp_path / stray).mkdir()
        (tmp_path / stray / "note.txt").write_text("mine")
    (tmp_path / "checkpoint-7").mkdir()  # an empty folder of that name: not a checkpoint (no manifest)
    state = tiny_state()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, state, save_total_limit=3)  # the line's own checkpoint-1..4 count: 1 goes
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-checkpoint-9", "checkpoint-100-backup", "checkpoint-2",
                                                          "checkpoint-3", "checkpoint-4", "checkpoint-7",
                                                          "checkpoint-best", "line.json"]
    assert (tmp_path / "checkpoint-best" / "note.txt").read_text() == "mine"


def names(out):
    return sorted((p.name for p in Path(out).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_latest_and_pruning_follow_the_line_after_a_rollback(tmp_path):
    """A first run saves checkpoint-2..8; a second resumes from checkpoint-4 (a rollback) and saves 5 and 6 (6
    replaces the first run's). `latest` is the second run's newest, never the abandoned checkpoint-8;
    pruning to 2 deletes the second run's older checkpoints (2 and 4, which it continues) and keeps the
    abandoned 8, where pruning by step number deleted the run's own checkpoint-5 and kept 8."""
    state = tiny_state()
    for step in (2, 4, 6, 8):
        save(tmp_path, step, state)
    checkpoints.start_line(tmp_path, tmp_path / "checkpoint-4")  # what a run resumed from 4 does first
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-4"  # (stopped before a save)
    assert checkpoints.last_intact(tmp_path).name == "checkpoint-4"
    save(tmp_path, 5, state, save_total_limit=2)
    assert names(tmp_path) == ["checkpoint-4", "checkpoint-5", "checkpoint-6", "checkpoint-8"]
    save(tmp_path, 6, state, save_total_limit=2)
    assert names(tmp_path) == ["checkpoint-5", "checkpoint-6", "checkpoint-8"]
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-6"
    second_line = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())["line"]
    assert [e["step"] for e in second_line] == [4, 5]  # its parent is checkpoint-5, whose parent is 4

    # Back to the abandoned line, by name: its checkpoint-6 is now the other line's (another id), so it is
    # neither picked nor pruned; that line's own checkpoint-8 is pruned once a newer one exists.
    checkpoints.start_line(tmp_path, tmp_path / "checkpoint-8")
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "checkpoint-8"
    save(tmp_path, 9, state, save_total_limit=1)
    assert names(tmp_path) == ["checkpoint-5", "checkpoint-6", "checkpoint-9"]


def test_a_line_whose_checkpoints_are_gone_is_said_so(tmp_path):
    state = tiny_state()
    save(tmp_path, 2, state)
    save(tmp_path, 4, state)
    checkpoints.start_line(tmp_path, tmp_path / "checkpoint-2")
    save(tmp_path, 3, state)
    for step in (2, 3):
        checkpoints.shutil.rmtree(tmp_path / f"checkpoint-{step}")
    with pytest.raises(CheckpointError, match=r"latest: no checkpoint of the line the last run continued "
                                              r"\(checkpoint-2, checkpoint-3\) is left whole, in .*; resume "
                                              r"from an intact one: --resume_from_checkpoint .*checkpoint-4"):
        checkpoints.find_checkpoint(tmp_path, "latest")


def test_non_finite_weights_are_never_saved(tmp_path):
    model, optimizer, scheduler = state = tiny_state()
    save(tmp_path, 2, state)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"weights are non-finite \(NaN or inf in model.layers.1.mlp.up_proj.weight\) "
                                              r"at step 5, so nothing was saved .*last intact checkpoint is .*checkpoint-2"):
        save(tmp_path, 5, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "line.json"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_names_the_last_intact_one(tmp_path, monkeypatch):
    state = tiny_state()
    save(tmp_path, 2, state)
    real = checkpoints.save_file
    monkeypatch.setattr(checkpoints, "save_file", lambda t, f, *a: no_space() if "rng" in str(f) else real(t, f, *a))
    with pytest.raises(CheckpointError) as err:
        save(tmp_path, 4, state)
    last = tmp_path / "checkpoint-2"
    assert str(err.value) == (f"no space left on device while saving {tmp_path / 'checkpoint-4'} (OSError: [Errno 28] No "
                              f"space left on device); the last intact checkpoint is {last}; free space and resume with "
                              f"--resume_from_checkpoint {last}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "line.json"]


def test_torch_save_on_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; the OSError behind it is what counts."""
    class Full:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "open", lambda p, mode: Full() if str(p).endswith(".pt") else open(p, mode), raising=False)
    with pytest.raises(CheckpointError, match="no space left on device while saving .*checkpoint-1 .*intact checkpoint is none; "
                                              "free space and run again"):
        save(tmp_path, 1, tiny_state())
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_saving_the_model_keeps_the_previous_model_folder(tmp_path, monkeypatch):
    cfg = dpo.Config(use_peft=False, output_dir=str(tmp_path))  # (save_model writes the model card from it)
    model, tokenizer = tiny_state()[0], make_tokenizer()
    checkpoints.save_model(cfg, model, tokenizer, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    real = PreTrainedModel.save_pretrained

    def full(self, folder, **kw):
        real(self, folder, **kw)
        (Path(folder) / "model.safetensors").write_bytes(b"half")  # a partial write, then the disk is full
        no_space()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(CheckpointError, match=f"no space left on device while saving {tmp_path / 'model'} .*the last intact "
                                              "checkpoint is none; free space and run again"):
        checkpoints.save_model(cfg, model, tokenizer, tmp_path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_checkpoint_without_manifest_loads_only_by_name_with_a_note(tmp_path, capsys):
    path = save(tmp_path, 2, tiny_state())
    (path / "manifest.json").unlink()  # as dpo.py wrote checkpoints before manifests (and lines)
    (tmp_path / "line.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint-<step> folder with a manifest.json.*checkpoint-2 was written "
                                              "by an older dpo.py: name it"):
        checkpoints.find_checkpoint(tmp_path, "latest")
    assert checkpoints.find_checkpoint(tmp_path, str(path)) == path
    assert load(path)["global_step"] == 2
    assert "has no manifest.json (written by an older dpo.py): its files are loaded unverified" in capsys.readouterr().out


def test_a_missing_resume_path_says_it_does_not_exist_and_lists_the_checkpoints(tmp_path):
    save(tmp_path, 2, tiny_state())
    with pytest.raises(CheckpointError) as err:
        checkpoints.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))
    assert str(err.value) == (f"checkpoint {tmp_path / 'checkpoint-9'} does not exist, in {tmp_path}; resume from an intact "
                              f"one: --resume_from_checkpoint {tmp_path / 'checkpoint-2'} (intact: checkpoint-2)")
    with pytest.raises(CheckpointError, match="no checkpoint-<step> folder .*start without --resume_from_checkpoint"):
        checkpoints.find_checkpoint(tmp_path / "empty", "latest")


def test_read_metrics_drops_only_a_half_written_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert checkpoints.read_metrics(path) == [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}]
    assert "dropped the last line" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match="line 2 of .*metrics.jsonl is not JSON"):
        checkpoints.read_metrics(path)
    assert checkpoints.read_metrics(tmp_path / "none.jsonl") == []


# ---- through dpo.main ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {"model": make_model_dir(base / "model"), "dataset": make_preference_dir(base / "data", n_train=16, n_test=8)}


def config(tiny, out, *extra):
    return run_config(tiny, out, "--use_peft", "False", *extra)


def test_resume_tolerates_a_half_written_metrics_line(tiny, tmp_path, capsys):
    dpo.main(config(tiny, tmp_path, "--max_steps", "3", "--save_steps", "2"))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.6')  # the process died in the middle of this write
    dpo.main(config(tiny, tmp_path, "--max_steps", "3", "--save_steps", "2", "--resume_from_checkpoint", "latest"))
    assert "dropped the last line" in capsys.readouterr().out
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_a_full_disk_at_the_final_save_names_the_checkpoint_and_leaves_no_partial_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    with pytest.raises(CheckpointError) as err:
        dpo.main(config(tiny, tmp_path, "--max_steps", "2", "--save_steps", "2"))
    last = tmp_path / "checkpoint-2"
    assert str(err.value).startswith(f"no space left on device while saving {tmp_path / 'model'} (OSError: [Errno 28] ")
    assert str(err.value).endswith(f"the last intact checkpoint is {last}; free space and resume with "
                                   f"--resume_from_checkpoint {last}")
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()
    dpo.main(config(tiny, tmp_path, "--max_steps", "2", "--resume_from_checkpoint", str(last)))  # what the message says
    assert (tmp_path / "model" / "model.safetensors").is_file()
