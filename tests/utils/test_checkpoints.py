"""A damaged checkpoint is one line naming it and the newest intact checkpoint beside it (never a promise of one
that does not exist)."""
import os

import pytest
import torch

from tcae_ldm.utils.checkpoints import CorruptCheckpointError, read_checkpoint


@pytest.fixture
def folder(tmp_path):
    torch.save({"global_step": 3, "w": torch.arange(1000.0)}, tmp_path / "step3.ckpt")
    torch.save({"global_step": 5, "w": torch.arange(1000.0) + 1}, tmp_path / "last.ckpt")
    os.utime(tmp_path / "step3.ckpt", (1, 1))  # older than last.ckpt
    return tmp_path


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # one flipped byte inside a tensor: torch.load alone would load it silently
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,why", [("truncated", "it is truncated or not a checkpoint"),
                                     ("empty", "it is empty"), ("garbled", "fails its CRC check")])
def test_damaged_checkpoint_names_itself_and_the_previous_one(folder, how, why):
    assert read_checkpoint(str(folder / "last.ckpt"))["global_step"] == 5
    _damage(folder / "last.ckpt", how)
    with pytest.raises(CorruptCheckpointError) as err:
        read_checkpoint(str(folder / "last.ckpt"))
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {folder / 'last.ckpt'} cannot be read: ") and why in msg
    assert f"the newest intact checkpoint beside it is {folder / 'step3.ckpt'} (global step 3)" in msg
    assert f"--ckpt_path {folder / 'step3.ckpt'}" in msg and "\n" not in msg


def test_no_intact_checkpoint_left_is_said_not_promised(folder):
    os.remove(folder / "step3.ckpt")
    _damage(folder / "last.ckpt", "truncated")
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint is left beside it, so the run must start "
                                                     "again without --ckpt_path"):
        read_checkpoint(str(folder / "last.ckpt"))
    with pytest.raises(FileNotFoundError, match=f"checkpoint {folder / 'gone.ckpt'} does not exist"):
        read_checkpoint(str(folder / "gone.ckpt"))
