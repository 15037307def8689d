"""The training/evaluation loader: webdataset shards -> :class:`~vlp.types.Batch`, resumable to the sample.

Stages, in order (what the iterator holds after each):

1. ``SlotStream``   (stream.py)     raw samples of this (rank, worker): shard order, split, shuffle buffer, mix
2. ``decode``       (decode.py)     RGB image (uint8 tensor for vlp's transform) + caption + label; bad samples
                                    skipped and counted by reason (the model's
                                    :class:`~vlp.data.preprocess.Preprocess`: alpha policy, draft)
3. ``transform``    (preprocess.py) (3, H, W) tensor, augmentation seeded by the sample's stream position
4. ``tokenize``     (tokenizer.py)  (B, L) ids and mask for a whole batch at once
5. ``collate``                      Batch + a report (logical worker, stream position, skip counts)

Batching happens inside the loader workers, so each batch comes from one worker together with that worker's
position after it. The main process keeps the position of the last batch it handed out for every worker;
on restore, workers are rotated so the next batch comes from the worker whose turn it was, and each worker
continues its raw stream from its saved address (the current shard at its byte offset, the shuffle buffer re-read;
see stream.py): the remaining stream is exactly what an uninterrupted run would have produced, at a cost that does
not grow with the epoch's progress. Streams are endless (epoch after epoch), so no rank ever runs dry. A position
saved with another number of ranks or workers resumes elastically (:meth:`ShardLoader.load_state_dicts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import DataConfig
from vlp.data import counters as reasons
from vlp.data.caption_hash import caption_hashes
from vlp.data.counters import SkipCounters, sum_counts
from vlp.data.decode import DecodeLimits, SampleError, decode_caption, decode_label, decode_metadata
from vlp.data.layout import IMAGE_EXTENSIONS
from vlp.data.positions import LoaderStateError
from vlp.data.preprocess import Preprocess
from vlp.data.stream import Slot, SlotStream, StreamItem, StreamSettings, derive_seed, elastic_states
from vlp.data.tokenizer import TextTokenizer
from vlp.data.transforms import ClipImageTransform, ImageTransform
from vlp.data.urls import ShardSource
from vlp.distributed import get_rank, get_world_size
from vlp.types import Batch

STATE_VERSION = 2  # 2: positions as addresses (shard, tar entry, byte offset, buffered samples)
logger = logging.getLogger("vlp.data")
# the config setting behind each field of a saved loader position (what a resume must not change)
STATE_FIELDS = {"sources": "data.sources", "weights": "data.sources weights", "mode": "data.mode",
                "seed": "data.seed", "shuffle_buffer": "data.shuffle_buffer", "workers": "data.workers",
                "rank": "the rank", "world_size": "the number of processes"}

# what may differ between a saved position and this loader for an elastic resume (everything else must match)
ELASTIC_FIELDS = ("rank", "world_size", "workers", "shuffle_buffer")


@contextlib.contextmanager
def _trainer_rng_kept() -> Iterator[None]:
    """In the main process (``data.workers=0``), restore the global torch and Python generators afterwards: the
    timm augmentation reseeds them per sample, and dropout, MLM masks and negatives of the trainer draw from them."""
    if get_worker_info() is not None:
        yield
        return
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader worker needs to rebuild its stream (plain, picklable values)."""

    sources: tuple[ShardSource, ...]
    settings: StreamSettings
    limits: DecodeLimits
    augment: str
    train: bool
    image_size: int
    tokenizer: str
    context_length: int
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    require_caption: bool = True
    preprocess: Preprocess | None = None  # None: the default record at image_size (see ShardLoader)


@dataclass
class WorkerReport:
    """Travels with each batch from a worker: who made it and where that worker's stream now stands."""

    worker: int
    stream_state: dict
    counts: dict[str, int]


@dataclass
class _Prepared:
    image: torch.Tensor
    caption: str
    label: int
    sample_id: int
    key: str


class _BatchMaker:
    """Stages 2-5 for one worker: pulls from the slot stream until a batch of good samples is full."""

    def __init__(self, spec: LoaderSpec, slot: Slot, stream: SlotStream, counters: SkipCounters) -> None:
        self.spec, self.slot, self.stream, self.counters = spec, slot, stream, counters
        self.preprocess = spec.preprocess or Preprocess(spec.image_size)
        self.transform: ImageTransform = self.preprocess.transform(spec.augment, train=spec.train)
        # vlp's uint8 transform takes decoded tensors and draws its crop box from this worker's own generator
        self.uint8_transform = isinstance(self.transform, ClipImageTransform)
        self.generator = torch.Generator()
        self.tokenizer = TextTokenizer(spec.tokenizer, spec.context_length)

    def _prepare(self, item: StreamItem) -> _Prepared:
        raw = item.raw
        if raw.image is None:
            raise SampleError(reasons.MISSING_IMAGE, "no image member (" + "/".join(IMAGE_EXTENSIONS) + ")")
        metadata = decode_metadata(raw.json)
        label = decode_label(metadata, raw.cls)
        caption = self._caption(raw.txt, metadata)
        if self.uint8_transform:
            image = self.preprocess.decode_pixels(raw.image, self.spec.limits, raw.image_ext)
        else:
            image = self.preprocess.decode(raw.image, self.spec.limits, raw.image_ext)
        if not (self.spec.train and self.spec.augment != "none"):
            return _Prepared(self.transform(image), caption, label, derive_seed(raw.url, raw.key), raw.key)
        seed = derive_seed(self.spec.settings.seed, "augment", self.slot.rank, self.slot.worker, item.position)
        return _Prepared(self._augment(image, seed), caption, label, derive_seed(raw.url, raw.key), raw.key)

    def _augment(self, image: object, seed: int) -> torch.Tensor:
        """The training transform with every random draw seeded by ``seed`` (the sample's stream position)."""
        if self.uint8_transform:  # its only random draw is the crop box: from this worker's generator
            return self.transform(image, generator=self.generator.manual_seed(seed))
        with _trainer_rng_kept():  # timm's transform draws from the global Python and torch generators
            random.seed(seed)
            torch.random.default_generator.manual_seed(seed)  # CPU generator only: ~1 us, not ~200 us
            return self.transform(image)

    def _caption(self, txt: bytes | None, metadata: dict) -> str:
        if self.spec.require_caption:
            return decode_caption(txt, metadata, self.spec.limits)
        try:  # classification sets (e.g. CLIP_benchmark shards) may carry no caption at all
            return decode_caption(txt, metadata, self.spec.limits)
        except SampleError:
            return ""

    def next_batch(self) -> tuple[Batch, WorkerReport]:
        """The next full batch; in a finite pass the last one may be smaller; StopIteration when done."""
        samples: list[_Prepared] = []
        while len(samples) < self.spec.batch_size:
            try:
                item = next(self.stream)
            except StopIteration:
                if not samples:
                    raise
                break
            try:
                samples.append(self._prepare(item))
            except SampleError as err:
                self.counters.add(err.reason, f"{item.raw.url}:{item.raw.key}", detail=str(err))
        text_ids, text_mask = self.tokenizer([s.caption for s in samples])
        batch = Batch(
            images=torch.stack([s.image for s in samples]),  # uint8 (B, 3, S, S) travels 4x lighter than float
            text_ids=text_ids,
            text_mask=text_mask,
            sample_ids=torch.tensor([s.sample_id for s in samples], dtype=torch.int64),
            labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
            keys=[s.key for s in samples],
        )
        batch.caption_hashes = torch.tensor(caption_hashes([s.caption for s in samples]))  # loss.positives=caption
        report = WorkerReport(self.slot.worker, self.stream.state(), self.counters.as_dict())
        return batch, report


def urls_digest(urls: tuple[str, ...] | list[str]) -> str:
    """A short, stable name of a shard list: its length and the start of the sha256 of its urls in order."""
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
    return f"{len(urls)} shards, sha256 {digest}"


class ShardDataset(IterableDataset):
    """Worker side of :class:`ShardLoader`: an endless iterator of ``(Batch, WorkerReport)``."""

    def __init__(self, spec: LoaderSpec, states: dict[int, dict], counts: dict[int, dict], rotation: int) -> None:
        super().__init__()
        self.spec, self.states, self.counts, self.rotation = spec, states, counts, rotation

    def __iter__(self) -> Iterator[tuple[Batch, WorkerReport]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.spec.num_workers
        slot = Slot(self.spec.rank, self.spec.world_size, logical, self.spec.num_workers)
        counters = SkipCounters(self.counts.get(logical, {}))  # counts up to the saved position, decode included
        # resuming adds only what is new: samples of the saved buffer that can no longer be read
        stream = SlotStream(list(self.spec.sources), slot, self.spec.settings, counters, self.states.get(logical))
        maker = _BatchMaker(self.spec, slot, stream, counters)
        while True:
            try:
                yield self._next(maker, in_main_process=info is None)
            except StopIteration:  # a finite pass is over: a last report (no batch) carries the final counts
                yield None, WorkerReport(slot.worker, stream.state(), counters.as_dict())
                return

    @staticmethod
    def _next(maker: _BatchMaker, in_main_process: bool) -> tuple[Batch, WorkerReport]:
        if not in_main_process:
            return maker.next_batch()
        python_state = random.getstate()  # keep the caller's RNG streams untouched
        try:
            with torch.random.fork_rng(devices=[]):
                return maker.next_batch()
        finally:
            random.setstate(python_state)


class ShardLoader:
    """Endless, resumable batches from webdataset shards for this rank.

    Iterating continues from the current position (a fresh loader starts at epoch 0). With ``epochs=N`` the
    stream ends after N epochs (evaluation: ``epochs=1, train=False`` visits every sample of this rank's share
    exactly once, in shard order, the last batch possibly smaller). ``state_dict()`` after
    consuming a batch, fed to ``load_state_dict()`` of a new loader, makes it yield exactly the batches that
    would have followed. ``skip_counts()`` sums the per-reason counts of dropped samples over workers.

    Workers ship uint8 images (a quarter of the bytes of float32 through shared memory); they are normalised
    here, in the main process, unless ``uint8_images=True``: then ``Batch.images`` stays uint8 and the caller
    normalises on the device with ``preprocess.normalize`` (4x less host-to-device traffic).

    Images are decoded and transformed with ``preprocess`` (the model's record, see :mod:`vlp.data.preprocess`);
    without one, with the default record at ``image_size`` (``data.jpeg_draft`` decides JPEG draft decoding). A
    given record decides the output size; ``image_size`` is then not used.
    """

    def __init__(self, config: DataConfig, *, image_size: int, context_length: int, train: bool = True,
                 rank: int | None = None, world_size: int | None = None, batch_size: int | None = None,
                 uint8_images: bool = False, epochs: int | None = None, require_caption: bool = True,
                 preprocess: Preprocess | None = None, resume: str = "address") -> None:
        sources = tuple(ShardSource.from_spec(s.urls, s.weight) for s in config.sources)
        self.preprocess = preprocess = preprocess or Preprocess(image_size, jpeg_draft=config.jpeg_draft)
        self.num_workers = config.workers
        self.spec = LoaderSpec(
            sources=sources,
            settings=StreamSettings(config.mode, config.seed, config.shuffle_buffer if train else 0, epochs,
                                    read_retries=config.read_retries, resume=resume),  # type: ignore[arg-type]
            limits=DecodeLimits(config.max_image_pixels, config.max_image_bytes, config.max_caption_chars),
            augment=config.augment, train=train, image_size=image_size, tokenizer=config.tokenizer,
            context_length=context_length, batch_size=batch_size or config.batch_size,
            rank=get_rank() if rank is None else rank,
            world_size=get_world_size() if world_size is None else world_size,
            num_workers=max(1, config.workers), require_caption=require_caption, preprocess=preprocess,
        )
        self.prefetch_factor = config.prefetch_factor
        self.uint8_images = uint8_images
        self._warn_about_small_sources()
        self._states: dict[int, dict] = {}
        self._counts: dict[int, dict[str, int]] = {}
        self._next_worker = 0

    def _warn_about_small_sources(self) -> None:
        slots = self.spec.world_size * self.spec.num_workers
        for source in self.spec.sources:
            if self.spec.settings.mode == "epoch" and len(source.urls) < slots:
                logger.warning("source %r has %d shards for %d ranks x %d workers: every worker reads every shard "
                               "and keeps its share of the samples (more I/O); write more, smaller shards",
                               source.spec, len(source.urls), self.spec.world_size, self.spec.num_workers)

    def __iter__(self) -> Iterator[Batch]:
        dataset = ShardDataset(self.spec, dict(self._states), dict(self._counts), rotation=self._next_worker)
        # DataLoader draws its workers' base seed from `generator` each time an iterator starts; the global generator
        # must not be touched (dropout, MLM masks and negatives draw from it, and checkpoints restore it exactly).
        # The workers reseed from the stream position anyway, so this generator's seed is immaterial.
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.spec.settings.seed),
        )
        for batch, report in loader:
            self._states[report.worker] = report.stream_state
            self._counts[report.worker] = report.counts
            if batch is None:
                continue
            self._next_worker = (report.worker + 1) % self.spec.num_workers
            if batch.images.dtype == torch.uint8 and not self.uint8_images:
                batch.images = self.preprocess.normalize(batch.images)
            yield batch

    def source_epochs(self) -> list[int]:
        """Per source, the lowest epoch any worker of this rank is in (small sources cycle faster)."""
        return [min((state["sources"][i]["epoch"] for state in self._states.values()), default=0)
                for i in range(len(self.spec.sources))]

    def epochs_read(self) -> list[int]:
        """Per source, the epochs any worker of this rank has begun (a partial one included): skip counts add up
        over them, so a damaged shard read in 3 epochs is counted 3 times."""
        return [max((state["sources"][i]["epoch"] + 1 for state in self._states.values()), default=0)
                for i in range(len(self.spec.sources))]

    @property
    def epoch(self) -> int:
        """Complete passes over the slowest source by every worker of this rank."""
        return min(self.source_epochs())

    def skip_counts(self) -> dict[str, int]:
        """Dropped samples, members and shards by reason, summed over this rank's workers and over the epochs read
        (:meth:`epochs_read`): a shard re-read in a later epoch is counted again."""
        return sum_counts(self._counts.values())

    def _fingerprint(self) -> dict:
        # the shard lists by count and digest: every rank's position travels in each checkpoint, and a LAION-size
        # url list is megabytes
        return {"sources": [urls_digest(s.urls) for s in self.spec.sources],
                "weights": [s.weight for s in self.spec.sources],
                "mode": self.spec.settings.mode, "seed": self.spec.settings.seed,
                "shuffle_buffer": self.spec.settings.shuffle_buffer, "rank": self.spec.rank,
                "world_size": self.spec.world_size, "workers": self.spec.num_workers}

    def state_dict(self) -> dict:
        """JSON-ready position of this rank's loader (after the last batch it yielded)."""
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "next_worker": self._next_worker,
                "workers": {str(w): {"stream": self._states[w], "counts": self._counts[w]}
                            for w in sorted(self._states)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly from a saved position; the data, seed, mode, ranks and workers must match."""
        changed = self._changed(state)
        if changed:
            raise LoaderStateError(f"cannot resume the data stream exactly: {self._describe(changed, state)}")
        self._next_worker = int(state["next_worker"])
        workers = {int(w): v for w, v in state["workers"].items()}
        self._states = {w: v["stream"] for w, v in workers.items()}
        self._counts = {w: dict(v["counts"]) for w, v in workers.items()}

    def load_state_dicts(self, states: list[dict | None]) -> bool:
        """Resume from the saved positions of every rank of a run (indexed by rank; a checkpoint's ``loader`` list).

        With the ranks and workers they were saved with, this rank continues exactly (``False`` is returned).
        Otherwise (another number of processes, ``data.workers`` or ``data.shuffle_buffer``) the resume is elastic
        and ``True`` is returned: what the interrupted epoch had not delivered is re-split over this topology's
        slots (:func:`vlp.data.stream.elastic_states`), so within that epoch every sample is delivered exactly once
        overall; later epochs are those of a fresh run on this topology. The skip counts of every old rank are
        carried on by rank 0."""
        saved = [s for s in states if s is not None]
        if not saved:
            return False
        own = states[self.spec.rank] if self.spec.rank < len(states) else None
        first = own or saved[0]
        changed = self._changed(first)
        if not changed:
            self.load_state_dict(first)
            return False
        fixed = [name for name in changed if name not in ELASTIC_FIELDS]
        if fixed:
            raise LoaderStateError(f"cannot resume the data stream: {self._describe(fixed, first)}")
        old_ranks, old_workers = int(first["fingerprint"]["world_size"]), int(first["fingerprint"]["workers"])
        if len(states) != old_ranks:
            raise LoaderStateError(f"the checkpoint holds loader positions of {len(states)} ranks, its fingerprint "
                                   f"says {old_ranks}")
        slots: dict[int, dict] = {}
        counts: list[dict[str, int]] = []
        for rank, state in enumerate(states):
            for worker, value in (state or {"workers": {}})["workers"].items():
                slots[rank * old_workers + int(worker)] = value["stream"]
                counts.append(value["counts"])
        workers = self.spec.num_workers
        new_states = elastic_states(list(self.spec.sources), self.spec.settings, (old_ranks, old_workers), slots,
                                    (self.spec.world_size, workers))
        mine = new_states[self.spec.rank * workers: (self.spec.rank + 1) * workers]
        self._states = dict(enumerate(mine))
        self._counts = {w: {} for w in range(workers)}
        if self.spec.rank == 0:
            self._counts[0] = sum_counts(counts)
        self._next_worker = 0
        logger.info("data stream resumed elastically: %d ranks x %d workers -> %d ranks x %d workers; the "
                    "interrupted epoch's remaining samples are re-split", old_ranks, old_workers,
                    self.spec.world_size, workers)
        return True

    def _changed(self, state: dict) -> list[str]:
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')!r} is not {STATE_VERSION} (a "
                                   "checkpoint of an older vlp): resume it with the version that wrote it")
        saved, current = state["fingerprint"], self._fingerprint()
        return [name for name in current if saved.get(name) != current[name]]

    def _describe(self, changed: list[str], state: dict) -> str:
        saved, current = state["fingerprint"], self._fingerprint()
        before, now = [saved.get(n) for n in changed], [current[n] for n in changed]
        names = ", ".join(STATE_FIELDS.get(name, name) for name in changed)
        return f"{names} changed since the checkpoint (saved {before}, now {now})"
