"""data.loader=dali: the NVIDIA DALI pipeline (the optional extra `dali`; docs/design.md §3 "data").

One pipeline definition, `pipeline(..., device=...)`: file reader (shard_id / num_shards,
pad_last_batch, name READER) → image decoder ("mixed" on a GPU, "cpu" otherwise) → resize
(shorter side to R, antialiased Lanczos-3; a no-op on a prepared folder) → centre crop R×R,
horizontal flip and HWC → CHW (crop_mirror_normalize, uint8) → float32 x·2/255 − 1 in [-1, 1],
the torch loader's normalisation. Only the decoder's device differs between the CPU graph,
which the tests run, and the GPU graph, which has never run on a GPU.

Neither the order nor the flips are DALI's own random ones: the reader gets an explicit file
list in the keyed global order (agm_fast.data.sample_order) and, as each file's label, 2 × its
list position + its keyed flip decision (agm_fast.data.flip_mask); the flip reads label & 1.
The list covers a window of whole steps, rank-major: shard r of num_shards = world is exactly
rank r's slice of each step, so a shard is whole batches and padding never occurs (the last
batch policy is FILL; a padded sample would fail the label check). The labels are checked
against the expected positions on every batch. After a window (at least one data epoch and
MIN_WINDOW_STEPS steps) the next pipeline is built; resuming at step s starts a window at s.

This module imports nothing from agm_fast: agm_fast.data passes the order and flips in.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math

import torch

PACKAGE = "nvidia-dali-cuda130"   # the `dali` extra of pyproject.toml pins its version
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm",
              ".pbm", ".jp2")   # what DALI's image decoder reads (no gif)
READER = "reader"
MIN_WINDOW_STEPS = 256


def status() -> tuple[bool, str]:
    """(installed, why): whether NVIDIA DALI can be imported, without importing it."""
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return False, "NVIDIA DALI is not installed (pip install --no-build-isolation -e '.[dali]')"
    try:
        return True, f"NVIDIA DALI {importlib.metadata.version(PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return True, "NVIDIA DALI (another build than " + PACKAGE + ")"


def pipeline(files: list[str], labels: list[int], *, batch_size: int, shard_id: int,
             num_shards: int, resolution: int, channels: int, device: str, num_threads: int,
             device_id: int | None, seed: int = 0):
    """The pipeline over `files` (outputs: images float32 [C, R, R] in [-1, 1], labels int32 [1]).
    device "cpu" decodes on the CPU (device_id None); "gpu" decodes with "mixed" on device_id."""
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    decoder = "mixed" if device == "gpu" else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def graph():
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id,
                                         num_shards=num_shards, random_shuffle=False,
                                         pad_last_batch=True, name=READER)
        images = fn.decoders.image(encoded, device=decoder,
                                   output_type=types.GRAY if channels == 1 else types.RGB)
        # the centre square (top, left = floor of half the excess, as Pillow's crop) → R×R
        shape = fn.peek_image_shape(encoded)
        height, width = shape[0], shape[1]
        side = dmath.min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        images = fn.resize(images, size=(resolution, resolution), antialias=True,
                           interp_type=types.INTERP_LANCZOS3,
                           roi_start=fn.cast(fn.stack(top, left), dtype=types.FLOAT),
                           roi_end=fn.cast(fn.stack(top + side, left + side), dtype=types.FLOAT))
        images = fn.crop_mirror_normalize(images, mirror=label & 1, dtype=types.UINT8,
                                          output_layout="CHW")
        return fn.cast(images, dtype=types.FLOAT) * (2.0 / 255.0) - 1.0, label

    return graph()


class DaliLoader:
    """Yields (step, global_indices [b] CPU int64, images float32 [b, C, R, R] on `device`) for
    steps start_step, start_step + 1, …, like data.BatchLoader with the same slice arguments
    (rank_offset must be a multiple of batch_size: shard = rank_offset / batch_size of
    global_batch / batch_size). order(global indices) → indices into `files`; flips(global
    indices) → bool flip decisions (None: no flips). A CUDA device decodes there ("mixed")."""

    name = "dali"

    def __init__(self, files, *, order, flips=None, batch_size: int, global_batch: int,
                 rank_offset: int = 0, start_step: int = 0, device="cpu", resolution: int,
                 channels: int, threads: int = 2, seed: int = 0, skipped: int = 0,
                 window_steps: int | None = None):
        if rank_offset % batch_size:
            raise ValueError(f"rank_offset={rank_offset} must be a multiple of batch_size={batch_size}")
        self.files, self.order, self.flips = list(files), order, flips
        self.batch_size, self.global_batch, self.rank_offset = batch_size, global_batch, rank_offset
        self.shard_id, self.num_shards = rank_offset // batch_size, global_batch // batch_size
        self.start_step, self.device = start_step, torch.device(device)
        self.resolution, self.channels, self.threads, self.seed = resolution, channels, threads, seed
        self.skipped_count = skipped
        self.window_steps = window_steps or max(math.ceil(len(self.files) / global_batch),
                                                MIN_WINDOW_STEPS)
        if 2 * self.window_steps * global_batch >= 2**31:
            raise ValueError("window too large for int32 labels")
        self.reader_meta: dict = {}   # of the latest window's reader (epoch_size, padding)

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self._window(step, self.window_steps)
            step += self.window_steps

    def window_list(self, first_step: int, steps: int) -> tuple[torch.Tensor, list[str], list[int]]:
        """Global indices [num_shards, steps, b], the reader's file list and its labels for the
        window of steps first_step … first_step + steps − 1 (the same on every rank)."""
        b = self.batch_size
        g = (torch.arange(first_step, first_step + steps)[None, :, None] * self.global_batch
             + torch.arange(self.num_shards)[:, None, None] * b + torch.arange(b)[None, None, :])
        flat = g.reshape(-1)
        files = [self.files[i] for i in self.order(flat).tolist()]
        flip = self.flips(flat).long() if self.flips is not None else torch.zeros_like(flat)
        return g, files, (2 * torch.arange(len(flat)) + flip).tolist()

    def _window(self, first_step: int, steps: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        g, files, labels = self.window_list(first_step, steps)
        cuda = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if cuda else None
        pipe = pipeline(files, labels, batch_size=self.batch_size, shard_id=self.shard_id,
                        num_shards=self.num_shards, resolution=self.resolution,
                        channels=self.channels, device="gpu" if cuda else "cpu",
                        num_threads=self.threads, device_id=device_id, seed=self.seed)
        batches = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                      last_batch_policy=LastBatchPolicy.FILL, auto_reset=False)
        self.reader_meta = pipe.reader_meta(READER)
        expected = torch.tensor(labels).reshape(self.num_shards, steps, self.batch_size)[self.shard_id]
        count = 0
        for k, out in enumerate(batches):
            got = out[0]["labels"].reshape(-1).cpu().to(torch.int64)
            if k >= steps or not torch.equal(got, expected[k]):
                raise RuntimeError(f"DALI reader out of step at step {first_step + k}: labels "
                                   f"{got.tolist()}, expected {expected[min(k, steps - 1)].tolist()}")
            # the iterator reuses its output buffers: the caller gets its own copy
            yield first_step + k, g[self.shard_id, k].clone(), out[0]["images"].to(self.device, copy=True)
            count += 1
        if count != steps:
            raise RuntimeError(f"DALI reader gave {count} batches for a window of {steps} steps")
