"""grain pipelines: stream rule, determinism, sharding, resumption, corrupt records, eval."""

import json
import logging
import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from vcmamba_jax import data as vd
from vcmamba_jax.data import transforms


def _train(source, **kwargs):
  kwargs = {
    'global_batch_size': 32,
    'image_size': 32,
    'seed': 0,
    'process_index': 0,
    'process_count': 1,
    **kwargs,
  }
  return iter(vd.create_train_dataset(source=source, **kwargs))


def _take(iterator, count):
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _expected_record(position, num_records, positions_per_epoch, seed=0, repeats=3):
  epoch, offset = divmod(position, positions_per_epoch)
  perm = np.random.default_rng((seed, 0, epoch)).permutation(num_records)
  return int(perm[offset // repeats])


@pytest.fixture(scope='module')
def digits_train(digits_dir):
  return vd.get_source(vd.DIGITS, 'train', digits_dir)


# --- Training stream ----------------------------------------------------------------------------


def test_train_iterator_on_fake_imagenet_yields_full_uint8_batches(fake_imagenet):
  iterator = vd.create_train_iterator(
    dataset=vd.IMAGENET,
    split='train',
    data_dir=fake_imagenet.data_dir,
    global_batch_size=8,
    image_size=64,
    seed=0,
    process_index=0,
    process_count=1,
  )
  source = vd.get_source(vd.IMAGENET, 'train', fake_imagenet.data_dir)
  for batch in _take(iterator, 4):
    assert batch['image'].shape == (8, 64, 64, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    assert batch['index'].dtype == np.int32 and batch['num_skipped'].dtype == np.int32
    assert np.all((batch['label'] >= 0) & (batch['label'] < 1000))
    assert [source[int(i)]['label'] for i in batch['index']] == batch['label'].tolist()
    # Real content (RandAugment may legitimately blank an image: posterize to 0 bits).
    assert (batch['image'].reshape(8, -1).std(axis=1) > 1).sum() >= 4


def test_repeated_augmentation_stream_follows_the_documented_rule(digits_train):
  # N = 1437 -> 1437 // 256 * 256 = 1280 samples per epoch = 40 steps of 32.
  num_records = len(digits_train)
  assert vd.train_steps_per_epoch(num_records, 32, repeated_aug=3) == 40
  batches = _take(_train(digits_train), 41)
  stream = np.concatenate([b['index'] for b in batches])
  expected = [_expected_record(g, num_records, 1280) for g in range(41 * 32)]
  np.testing.assert_array_equal(stream, expected)
  # Each index 3 times in a row; 426 full triples + 2 copies in epoch 0, all distinct.
  epoch0 = stream[:1280]
  assert np.all(epoch0[0:1278:3] == epoch0[1:1278:3]) and np.all(
    epoch0[0:1278:3] == epoch0[2:1278:3]
  )
  assert len(set(epoch0[0:1278:3].tolist())) == 426
  # Epoch 1 starts a new permutation at step 40.
  assert stream[1280] == stream[1282] and stream[1280] != epoch0[0]
  # The three repeats of an image get different augmentations.
  first = batches[0]['image'][:3].reshape(3, -1)
  assert len({row.tobytes() for row in first}) == 3
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.tolist() == [int(digits_train[int(i)]['label']) for i in stream]


def test_same_seed_gives_identical_batches_and_another_seed_differs(digits_train):
  first = _take(_train(digits_train, seed=3), 3)
  _assert_same_batches(first, _take(_train(digits_train, seed=3), 3))
  other = _take(_train(digits_train, seed=4), 3)
  assert not np.array_equal(first[0]['index'], other[0]['index'])
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_processes_read_contiguous_blocks_of_one_global_batch(digits_train):
  single = _take(_train(digits_train, global_batch_size=24), 3)
  shards = [
    _take(_train(digits_train, global_batch_size=24, process_index=p, process_count=3), 3)
    for p in range(3)
  ]
  for step in range(3):
    for key in ('index', 'label', 'image'):
      for p in range(3):
        assert shards[p][step][key].shape[0] == 8  # local batch = global / processes
      # Process p holds rows [8p, 8p+8) of the global batch: the same array for any P.
      merged = np.concatenate([shards[p][step][key] for p in range(3)])
      np.testing.assert_array_equal(merged, single[step][key], err_msg=key)


def test_worker_processes_give_the_same_batches_and_resume_from_checkpoint(digits_train, tmp_path):
  reference = _take(_train(digits_train, num_workers=0), 4)
  manager = ocp.CheckpointManager(
    tmp_path / 'ckpt', options=ocp.CheckpointManagerOptions(create=True)
  )
  with_workers = _train(digits_train, num_workers=2)
  got = [next(with_workers), next(with_workers)]
  manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(with_workers)))
  manager.wait_until_finished()
  got += _take(with_workers, 2)
  _assert_same_batches(got, reference)
  assert flags.FLAGS.is_parsed()  # pytest never parsed absl flags; the pipeline handled it

  resumed = _train(digits_train, num_workers=2)
  manager.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(_take(resumed, 2), reference[2:])


def test_orbax_checkpoint_restores_the_next_batches(digits_train, tmp_path):
  manager = ocp.CheckpointManager(
    tmp_path / 'ckpt', options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  )
  iterator = _train(digits_train)
  for _ in range(3):
    next(iterator)
  manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = _take(iterator, 2)
  state_files = list((tmp_path / 'ckpt' / '3' / 'data_iter').glob('*.json'))
  assert len(state_files) == 1 and json.loads(state_files[0].read_text())

  fresh = _train(digits_train)
  manager.restore(
    manager.latest_step(),
    args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)),
  )
  _assert_same_batches(_take(fresh, 2), expected)


def test_corrupt_records_are_skipped_counted_and_logged(fake_imagenet, caplog):
  source = vd.get_source(vd.IMAGENET, 'train', fake_imagenet.data_dir)
  corrupt = set()
  for i in range(len(source)):
    try:
      transforms.decode_image(source[i]['image'])
    except vd.ImageDecodeError:
      corrupt.add(i)
  assert len(corrupt) == 2

  steps = 30
  with caplog.at_level(logging.WARNING):
    batches = _take(
      _train(source, global_batch_size=8, image_size=48, seed=1, randaugment=None), steps
    )
  # Replay the documented rule: N = 80 < 256, so an epoch is 80 positions (10 steps of 8); a
  # corrupt record is replaced by uniform draws from default_rng((seed, 2, position)).
  kept, skipped = [], []
  for position in range(steps * 8):
    record, count = _expected_record(position, len(source), 80, seed=1), 0
    substitutes = np.random.default_rng((1, 2, position))
    while record in corrupt:
      count += 1
      record = int(substitutes.integers(len(source)))
    kept.append(record)
    skipped.append(count)
  assert sum(skipped) >= 3  # the scenario really contains corrupt records
  for batch in batches:
    assert batch['image'].shape == (8, 48, 48, 3)  # batches stay full
    assert batch['image'].reshape(8, -1).std(axis=1).min() > 1  # with real images
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), kept)
  np.testing.assert_array_equal(np.concatenate([b['num_skipped'] for b in batches]), skipped)
  assert not set(np.concatenate([b['index'] for b in batches]).tolist()) & corrupt
  logged = [
    r.getMessage() for r in caplog.records if 'Skipping undecodable record' in r.getMessage()
  ]
  assert len(logged) == sum(skipped)
  assert all(any(f'record {i} ' in message for i in corrupt) for message in logged)


def test_a_broadly_corrupt_dataset_fails_loudly():
  source = [{'image': b'\xff\xd8\xff\xe0 not really a jpeg', 'label': 0}] * 300
  with pytest.raises(RuntimeError, match='broadly corrupt'):
    _take(_train(source, global_batch_size=4), 1)


# --- Epoch arithmetic ---------------------------------------------------------------------------


def test_epoch_rule_and_argument_validation():
  assert vd.samples_per_epoch(1281167, repeated_aug=3) == 1281024  # RASampler: N // 256 * 256
  assert vd.train_steps_per_epoch(1281167, 1024, repeated_aug=3) == 1251
  assert vd.samples_per_epoch(1281167, repeated_aug=1) == 1281167
  assert vd.samples_per_epoch(200, repeated_aug=3) == 200
  assert vd.eval_num_batches(50000, 1024, 8) == 49
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    vd.create_train_dataset(
      source=list(range(1000)), global_batch_size=10, process_index=0, process_count=4
    )
  with pytest.raises(ValueError, match='larger than one epoch'):
    vd.train_steps_per_epoch(100, 128)


def test_measure_throughput_counts_images(digits_train):
  result = vd.measure_throughput(_train(digits_train, global_batch_size=16), 3, warmup_batches=1)
  assert result['batch_size'] == 16 and result['images_per_sec'] > 0
  assert result['batches_per_sec'] == pytest.approx(3 / result['seconds'])


# --- Evaluation ---------------------------------------------------------------------------------


@pytest.mark.parametrize('process_count,global_batch_size', [(1, 5), (3, 6), (4, 8)])
def test_eval_covers_every_record_exactly_once_with_equal_batch_counts(
  fake_imagenet, process_count, global_batch_size
):
  source = vd.get_source(vd.IMAGENET, 'validation', fake_imagenet.data_dir)
  local = global_batch_size // process_count
  num_batches = vd.eval_num_batches(len(source), global_batch_size, process_count)
  assert num_batches == math.ceil(math.ceil(23 / process_count) / local)
  seen = []
  for p in range(process_count):
    batches = list(
      vd.create_eval_iterator(
        dataset=vd.IMAGENET,
        data_dir=fake_imagenet.data_dir,
        global_batch_size=global_batch_size,
        image_size=32,
        process_index=p,
        process_count=process_count,
      )
    )
    assert len(batches) == num_batches  # same count on every process
    start, end = vd.eval_shard_bounds(23, p, process_count)
    indices = []
    for batch in batches:
      assert batch['image'].shape == (local, 32, 32, 3) and batch['mask'].dtype == np.bool_
      valid = batch['mask']
      assert np.all(batch['index'][~valid] == -1) and np.all(batch['image'][~valid] == 0)
      assert np.all(batch['index'][valid] >= 0)
      for i, label in zip(batch['index'][valid], batch['label'][valid], strict=True):
        assert label == source[int(i)]['label']
      indices += batch['index'][valid].tolist()
    assert indices == list(range(start, end))  # contiguous shard, in order
    seen += indices
  assert sorted(seen) == list(range(23))


def test_eval_with_worker_processes_matches_in_process(fake_imagenet):
  def batches(num_workers):
    return list(
      vd.create_eval_iterator(
        dataset=vd.IMAGENET,
        data_dir=fake_imagenet.data_dir,
        global_batch_size=4,
        image_size=32,
        process_index=0,
        process_count=1,
        num_workers=num_workers,
      )
    )

  in_process = batches(0)
  assert len(in_process) == 6  # ceil(23 / 4)
  _assert_same_batches(batches(2), in_process)
