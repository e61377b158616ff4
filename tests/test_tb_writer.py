"""ftrain.tb_writer writes TensorBoard event files that TensorBoard itself reads: scalars, wall times, and the
purge of what a killed attempt logged after the step a resumed run starts from."""

from __future__ import annotations

import struct

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event

from ftrain.events import read_run_scalars
from ftrain.tb_writer import ScalarWriter, _masked_crc32c


def _accumulated(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_read_back_by_tensorboard_with_their_steps_values_and_wall_times(tmp_path):
    writer = ScalarWriter(tmp_path)
    for step in range(1, 6):
        writer.add_scalar("train/loss", 1.0 / step, step)
        writer.add_scalar("checkpoint/blocking_s", step * 1e-3, step)
    writer.add_scalar("train/step", 3, 2**40)  # a large step needs a long varint
    writer.close()
    scalars = _accumulated(tmp_path)
    loss = scalars.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [e.value for e in loss] == [struct.unpack("<f", struct.pack("<f", 1.0 / s))[0] for s in range(1, 6)]
    assert all(e.wall_time > 1.7e9 for e in loss)
    assert scalars.Scalars("train/step")[0].step == 2**40


def test_a_resumed_writer_purges_what_the_killed_attempt_logged_from_its_step_on(tmp_path):
    run = tmp_path / "run"
    first = ScalarWriter(run / "tb")
    for step in range(1, 11):
        first.add_scalar("train/step_time_s", 0.1, step)
        first.add_scalar("train/loss", float(step), step)
    first.flush()  # then killed: never closed
    resumed = ScalarWriter(run / "tb", purge_step=7)
    for step in range(7, 9):
        resumed.add_scalar("train/step_time_s", 0.1, step)
        resumed.add_scalar("train/loss", step + 0.5, step)
    resumed.close()
    assert read_run_scalars(run)["train/loss"] == {**{s: float(s) for s in range(1, 7)}, 7: 7.5, 8: 8.5}


def test_records_are_framed_with_tensorflows_masked_crc32c(tmp_path):
    # the CRC-32C check value of "123456789" is 0xE3069283; TFRecord masks it
    crc = 0xE3069283
    assert _masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
    writer = ScalarWriter(tmp_path)
    writer.add_scalar("x", 2.0, 3)
    writer.close()
    raw = writer.path.read_bytes()
    records, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<Q", raw, offset)
        assert struct.unpack_from("<I", raw, offset + 8)[0] == _masked_crc32c(raw[offset : offset + 8])
        data = raw[offset + 12 : offset + 12 + length]
        assert struct.unpack_from("<I", raw, offset + 12 + length)[0] == _masked_crc32c(data)
        records.append(Event.FromString(data))
        offset += 16 + length
    assert records[0].file_version == "brain.Event:2"
    assert records[1].step == 3 and records[1].summary.value[0].tag == "x" and records[1].summary.value[0].simple_value == 2.0


def test_a_write_error_reaches_the_caller_as_oserror(tmp_path):
    writer = ScalarWriter(tmp_path)
    writer._file.close()
    writer.add_scalar("x", 1.0, 1)
    with pytest.raises((OSError, ValueError)):
        writer.flush()


def test_files_sort_in_the_order_they_were_made_within_one_second(tmp_path):
    """TensorBoard reads a directory's event files in name order and a purge applies to what was read before it:
    writers made one after the other (a rollback reopens one in the same process) must sort in that order, also
    past a tenth or a hundredth file of one process."""
    made = [ScalarWriter(tmp_path / "tb").path.name for _ in range(120)]
    assert sorted(made) == made
