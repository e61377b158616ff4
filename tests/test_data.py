import numpy as np
import pytest
import torch

from conftest import assert_same_tensors, check_ok, checkpoint_tensors, run_train, scalars
from ftrain import tags
from ftrain.config import DataConfig
from ftrain.data import GlobalOrderSampler, WindowDataset, build_dataloader, builtin_corpus_files, corpus_files


def test_builtin_corpus_is_real_text():
    files = builtin_corpus_files()
    assert len(files) > 50 and all(f.suffix == ".py" for f in files)
    assert "def " in files[0].read_text(errors="replace")


def test_corpus_path_file_and_dir(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    (tmp_path / "c.bin").write_bytes(b"\0")
    assert [p.name for p in corpus_files(str(tmp_path))] == ["a.txt", "b.md"]
    assert corpus_files(str(tmp_path / "a.txt")) == [tmp_path / "a.txt"]
    with pytest.raises(ValueError, match="does not exist"):
        corpus_files(str(tmp_path / "missing"))


def test_windows_are_next_byte_targets():
    ds = WindowDataset(torch.arange(50, dtype=torch.uint8), seq_len=8)
    index, x, y = ds[2]
    assert index == 2 and x.tolist() == list(range(16, 24)) and y.tolist() == list(range(17, 25))


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_ranks_split_each_global_batch_disjointly():
    world, batch = 3, 4
    per_rank = [_take(GlobalOrderSampler(100, batch, r, world, seed=1), batch * 5) for r in range(world)]
    for step in range(5):
        seen = [i for r in range(world) for i in per_rank[r][step * batch : (step + 1) * batch]]
        assert len(set(seen)) == world * batch
    everything = [i for rank in per_rank for i in rank]
    assert len(set(everything)) == len(everything)  # within one epoch nothing repeats


def test_epochs_roll_over_and_reshuffle():
    sampler = GlobalOrderSampler(10, 3, 0, 1, seed=0)
    first = _take(sampler, 9)  # 3 full batches, the tail of 1 is dropped
    second = _take(sampler, 18)[9:]
    assert sorted(first) != sorted(range(10)) and len(set(first)) == 9
    assert second != first


def test_position_is_global_whatever_the_world_size():
    two = [_take(GlobalOrderSampler(1000, 4, r, 2, seed=3), 8) for r in range(2)]
    one = _take(GlobalOrderSampler(1000, 8, 0, 1, seed=3), 16)
    assert sorted(two[0] + two[1]) == sorted(one)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_resumes_exactly(num_workers):
    cfg = DataConfig(path="", num_workers=num_workers)

    def loader():
        return build_dataloader(cfg, seq_len=32, batch_size=4, rank=1, world_size=2, seed=5)

    reference = loader()
    it = iter(reference)
    expected = [next(it)[0].tolist() for _ in range(7)]

    first = loader()
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    del it

    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it)[0].tolist() for _ in range(4)] == expected[3:]


# ------------------------------------------------------------------------------------- data.format=tokens
def _token_file(path, count: int, dtype=np.uint16, vocab: int = 1000) -> str:
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, size=count, dtype=np.int64).astype(dtype).tofile(path)
    return str(path)


def test_recipe_trains_on_a_token_file_and_resumes_bit_for_bit(tmp_path):
    tokens = _token_file(tmp_path / "train.bin", 40_000, np.uint32)
    options = ("data.format=tokens", f"data.path={tokens}", "data.dtype=uint32", "model.vocab_size=1000")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    check_ok(run_train(reference, *options, "train.max_steps=12", nproc=0))
    check_ok(run_train(resumed, *options, "train.max_steps=6", nproc=0))
    # The schedule depends on train.max_steps: resume with the same length, from a checkpoint of step 6.
    check_ok(run_train(resumed, *options, "train.max_steps=12", "checkpoint.resume=6", nproc=0))
    assert scalars(resumed / "tb", tags.LOSS) == scalars(reference / "tb", tags.LOSS)
    assert_same_tensors(
        checkpoint_tensors(reference / "checkpoints" / "step_00000012"),
        checkpoint_tensors(resumed / "checkpoints" / "step_00000012"),
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such token file"),
        (b"", "is empty"),
        (b"\x01\x02\x03", "not a whole number of uint16 tokens"),
        (np.arange(10, dtype=np.uint16).tobytes(), "fewer than one window"),
        (np.full(100_000, 5000, dtype=np.uint16).tobytes(), "not below model.vocab_size=1000"),
    ],
    ids=["missing", "empty", "ragged", "short", "id too large"],
)
def test_a_bad_token_file_is_one_line_before_anything_is_written(tmp_path, content, message):
    path = tmp_path / "train.bin"
    if content is not None:
        path.write_bytes(content)
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, "data.format=tokens", f"data.path={path}", "model.vocab_size=1000", nproc=0)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not run_dir.exists()
