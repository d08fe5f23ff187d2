"""scripts/predict.py: eval preprocessing, top-k output and agreement with the model."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from tests.scripts.conftest import NANO, NANO_SIZE, load_script
from vcmamba_jax import create_model
from vcmamba_jax.data import eval_preprocess, imagenet_class_names, normalize

predict = load_script('predict')

LINE = re.compile(r'^  (\d+)\. (\d\.\d{4})  (.+) \((\d+)\)$')


def parse_text(out: str) -> dict[str, list[tuple[int, float, str, int]]]:
  """{image path: [(rank, probability, name, class index), ...]} from predict's text output."""
  results: dict[str, list] = {}
  current = None
  for line in out.splitlines():
    match = LINE.match(line)
    if match:
      rank, prob, name, index = match.groups()
      results[current].append((int(rank), float(prob), name, int(index)))
    else:
      current = line
      results[current] = []
  return results


def test_prints_topk_classes_per_image(nano_pth, jpeg_images, tmp_path, capsys):
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not an image')
  argv = [
    '--weights',
    str(nano_pth),
    '--image',
    str(jpeg_images[0]),
    str(broken),
    '--image',
    str(jpeg_images[1]),
    '--topk',
    '4',
    '--batch_size',
    '8',
  ]
  assert predict.main(argv) == 1  # the unreadable image makes the exit status non-zero
  captured = capsys.readouterr()
  assert f'cannot read image {broken}' in captured.err
  results = parse_text(captured.out)
  assert list(results) == [str(path) for path in jpeg_images]
  names = imagenet_class_names()
  for rows in results.values():
    assert [rank for rank, *_ in rows] == [1, 2, 3, 4]
    probs = [prob for _, prob, *_ in rows]
    assert probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1.0 + 1e-3
    assert all(name == names[index] for _, _, name, index in rows)
    assert len({index for *_, index in rows}) == 4


def test_json_output_matches_the_model(nano_exported, nano_variables, jpeg_images, capsys):
  argv = ['--weights', str(nano_exported), '--model', NANO, '--json', '--topk', '5', '--image'] + [
    str(path) for path in jpeg_images
  ]
  assert predict.main(argv) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [record['image'] for record in records] == [str(path) for path in jpeg_images]

  # Reference: the eval transform, normalisation, the model and a softmax, spelt out.
  model = create_model(NANO, num_classes=1000, img_size=NANO_SIZE)
  crops = np.stack([eval_preprocess(path.read_bytes(), NANO_SIZE, 0.875) for path in jpeg_images])
  logits, _ = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False))(nano_variables, crops)
  expected = np.asarray(jax.nn.softmax(logits, axis=-1))
  for record, probs in zip(records, expected):
    top = record['top']
    assert [entry['rank'] for entry in top] == [1, 2, 3, 4, 5]
    assert [entry['class'] for entry in top] == np.argsort(-probs)[:5].tolist()
    np.testing.assert_allclose(
      [entry['probability'] for entry in top], np.sort(probs)[::-1][:5], rtol=1e-4, atol=1e-6
    )


def test_bad_arguments(nano_pth, jpeg_images, capsys):
  with pytest.raises(SystemExit) as info:
    predict.main(['--weights', str(nano_pth), '--image', str(jpeg_images[0]), '--topk', '0'])
  assert info.value.code == 2
  assert (
    predict.main(
      ['--weights', str(nano_pth), '--model', 'vcmamba_b', '--image', str(jpeg_images[0])]
    )
    == 1
  )
  assert 'looks like a vcmamba_nano checkpoint' in capsys.readouterr().err
