"""FeatureQueue: batched enqueue == a row-by-row Python ring, slot-order reads, exact state_dict round-trip."""

from __future__ import annotations

import pytest
import torch

from vlp.training.queue import FeatureQueue


class ListRing:
    """The reference: a Python list written one row at a time."""

    def __init__(self, size: int) -> None:
        self.slots: list[tuple[torch.Tensor, torch.Tensor, int] | None] = [None] * size
        self.ptr = 0

    def push(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        for row in range(image.shape[0]):
            self.slots[self.ptr] = (image[row], text[row], int(ids[row]))
            self.ptr = (self.ptr + 1) % len(self.slots)

    def filled(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [slot for slot in self.slots if slot is not None]


def rows(n: int, dim: int, start_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen), torch.arange(start_id, start_id + n)


def assert_matches(queue: FeatureQueue, ring: ListRing) -> None:
    image, text, ids = queue.valid()
    expected = ring.filled()
    assert int(queue.count) == len(expected) == image.shape[0] == text.shape[0] == ids.shape[0]
    assert int(queue.ptr) == ring.ptr
    if expected:
        assert torch.equal(image, torch.stack([e[0] for e in expected]))
        assert torch.equal(text, torch.stack([e[1] for e in expected]))
        assert ids.tolist() == [e[2] for e in expected]
    assert (queue.sample_ids[len(expected) :] == -1).all()  # slots never written keep the empty id


@pytest.mark.parametrize("batch", [1, 3, 7, 10])
def test_batched_enqueue_equals_row_by_row_ring(batch: int) -> None:
    queue, ring = FeatureQueue(7, 4), ListRing(7)
    assert_matches(queue, ring)
    for step in range(6):
        image, text, ids = rows(batch, 4, 100 * step, seed=step)
        queue.enqueue(image, text, ids)
        ring.push(image, text, ids)
        assert_matches(queue, ring)


def test_mixed_batch_sizes_and_oversized_batch_keep_the_last_rows() -> None:
    queue, ring = FeatureQueue(5, 3), ListRing(5)
    for step, n in enumerate([2, 0, 4, 11, 1, 5, 6]):
        image, text, ids = rows(n, 3, 100 * step, seed=step)
        queue.enqueue(image, text, ids)
        ring.push(image, text, ids)
        assert_matches(queue, ring)
    image, text, ids = rows(13, 3, 1000, seed=99)
    queue.enqueue(image, text, ids)
    assert sorted(queue.sample_ids.tolist()) == list(range(1008, 1013))


def test_valid_is_slot_order_and_the_whole_buffer_when_full() -> None:
    queue = FeatureQueue(4, 2)
    queue.enqueue(*rows(3, 2, 10, seed=0))
    assert queue.valid()[2].tolist() == [10, 11, 12]
    queue.enqueue(*rows(2, 2, 20, seed=1))  # wraps: slot 3 <- 20, slot 0 <- 21
    image, _, ids = queue.valid()
    assert ids.tolist() == [21, 11, 12, 20] and image.shape == (4, 2)
    assert image.data_ptr() == queue.image_features.data_ptr()  # a view, no copy


def test_enqueue_casts_detaches_and_stays_on_the_buffers() -> None:
    queue = FeatureQueue(3, 2)
    image = torch.randn(2, 2, dtype=torch.bfloat16, requires_grad=True)
    queue.enqueue(image, image.detach().double(), torch.tensor([4, 5], dtype=torch.int32))
    assert queue.image_features.dtype == queue.text_features.dtype == torch.float32
    assert queue.sample_ids.dtype == torch.int64 and not queue.image_features.requires_grad
    assert torch.equal(queue.image_features[:2], image.detach().float())


def test_state_dict_round_trip_and_later_enqueues_agree() -> None:
    queue = FeatureQueue(6, 3)
    for step in range(3):
        queue.enqueue(*rows(4, 3, 10 * step, seed=step))
    state = queue.state_dict()
    assert set(state) == {"image_features", "text_features", "sample_ids", "groups", "ptr", "count"}
    fresh = FeatureQueue(6, 3)
    fresh.load_state_dict(state)
    for name, tensor in queue.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    for step in range(3, 6):
        batch = rows(5, 3, 10 * step, seed=step)
        queue.enqueue(*batch)
        fresh.enqueue(*batch)
        for a, b in zip(queue.valid(), fresh.valid(), strict=True):
            assert torch.equal(a, b)
    assert int(fresh.ptr) == int(queue.ptr) and int(fresh.count) == int(queue.count) == 6


def test_invalid_sizes_and_shapes_fail_clearly() -> None:
    for size, dim in [(0, 4), (4, 0), (-1, 2), (2.5, 2)]:
        with pytest.raises(ValueError, match="queue"):
            FeatureQueue(size, dim)  # type: ignore[arg-type]
    queue = FeatureQueue(4, 3)
    assert (queue.size, queue.dim) == (4, 3) and "size=4, dim=3" in repr(queue)
    with pytest.raises(ValueError, match="shape"):
        queue.enqueue(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="sample_ids"):
        queue.enqueue(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))
