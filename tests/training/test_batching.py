import numpy as np
import torch

from captioner.training.batching import CaptionBatches


def plan(**kwargs):
    # 10 images; image 3 has one caption, image 7 none; others three each
    image_index = [i for i in range(10) if i not in (3, 7) for _ in range(3)] + [3]
    lengths = np.array([4 + (row % 3) for row in range(len(image_index))], dtype=np.int32)
    tokens = np.zeros((len(image_index), 8), dtype=np.int32)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, 1 : length - 1], tokens[row, length - 1] = 1, 10 + image_index[row], 2
    settings = {"batch_size": 4, "seq_per_img": 2, "seed": 0, **kwargs}
    return CaptionBatches({i: i for i in range(10)}, tokens, lengths, np.array(image_index), **settings)


def test_epoch_plan_is_deterministic_and_covers_each_captioned_image_once():
    batches = plan()
    first, again, other = batches.epoch(0), batches.epoch(0), batches.epoch(1)
    assert [b.positions for b in first] == [b.positions for b in again]
    assert [b.positions for b in first] != [b.positions for b in other]
    seen = sorted(p for b in first for p in b.positions)
    assert seen == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # image 7 has no caption to learn from
    for batch in first:
        assert batch.captions.shape[0] == 2 * len(batch.positions)
        assert batch.captions.shape[1] == int(batch.lengths.max())
        for i, position in enumerate(batch.positions):  # each image's own captions, seq_per_img of them
            assert torch.all(batch.captions[2 * i : 2 * i + 2, 1] == 10 + position)
    assert len(batches) == 3
    assert [b.positions for b in batches.epoch(0, skip=2)] == [b.positions for b in first[2:]]


def test_ranks_split_the_same_plan():
    single = plan().epoch(4)
    ranks = [plan(rank=r, world_size=2).epoch(4) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1  # 3 batches -> 2 usable, one each
    assert ranks[0][0].positions == single[0].positions and ranks[1][0].positions == single[1].positions
