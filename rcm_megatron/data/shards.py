"""Webdataset tar shards of training latents, and a loader over them that is sharded over
data-parallel ranks, shuffled by seed and epoch, prefetched, and exactly resumable.

A dataset directory (written by ``tools/prepare_data.py`` or ``tools/synthesize_data.py``)::

    meta.json                       {"format": "rcm-megatron-shards/1", "latent_shape": [C,T,H,W],
                                     "text_len": 512, "text_dim": 4096, ...provenance}
    negative_context.pth            {"context": [L_neg, D], "prompt": str}  (the CFG negative prompt)
    shard-000000.tar                webdataset samples, one key each:
                                      KEY.latents.pth  [C,T,H,W] (bf16 by default)
                                      KEY.context.pth  [L_i, D]  the prompt's L_i <= text_len tokens
                                      KEY.txt          the prompt
                                      KEY.json         provenance (source file, frames, fps, ...)
                                      image-to-video datasets also (meta.json "conditions": field -> shape):
                                      KEY.first_frame.pth   [C,1,H,W]   the clean first latent frame
                                      KEY.condition.pth     [4+C,T,H,W] Wan's mask + condition latents
                                      KEY.image_embeds.pth  [L_img,D_img] CLIP image embeddings
    shard-000000.tar.index.json     member offsets of that shard, written with it

Text embeddings are stored without padding and zero-padded to ``text_len`` on load (Wan
pads umT5 outputs with zeros to 512), which keeps shards ~2x smaller.

**Global sample index.** Shards are ordered by path; sample j of shard s has index
``offset[s] + j`` (offset = running count over the ordered shards): dense 0..N-1, the same
on every rank and after every restart, so the layout-invariant RNG can key draws by it.
It changes only if the shard set changes (``state_dict`` records N and refuses another).

**Order.** One global sequence per epoch, a function of (seed, epoch) only: the shard order
is permuted, the concatenated samples are cut into windows of ``shuffle_window`` and each
window is permuted. Global batch k is positions [k B, (k+1) B) of the running sequence
(epochs follow each other without a gap); DP rank r takes its contiguous B/dp slice and
cuts it into micro-batches. So the *global* batch does not depend on the DP size, and TP,
CP and PP peers of one DP rank get the same samples (they pass the same ``dp_rank``). The
position is just the number of micro-batches consumed: ``state_dict`` saves it and
``load_state_dict`` restores it with no replay of earlier samples.

**Why not webdataset's reader.** ``webdataset.WebDataset`` streams shards through a
shuffle buffer: its order depends on read timing and buffer state, so it cannot resume
at an exact sample without replaying the epoch, and it splits by shard, so DP ranks see
different amounts of data. ``wids`` (webdataset's indexed reader) gives random access but
copies shards to a local cache and prints on construction. Shards are written with
``webdataset.TarWriter`` (standard webdataset layout, readable by any webdataset tool);
reading uses the member offsets recorded at write time (``os.pread``, thread-safe, one
read per member) so any position maps straight to a sample.

**Bad samples** (unreadable member, wrong shape, non-finite values or values beyond
``--max-latent-magnitude``) are replaced by the
next valid sample in index order (a function of the data alone, so resume and every
layout still agree), counted in ``bad_samples`` and warned about; only when no valid
sample remains does reading fail, with an error naming the dataset. A shard that is
unreadable, truncated or empty when the loader starts gives no samples; it is counted in
``bad_shards`` and the samples its index recorded in ``bad_samples``.

The code lives in four modules: ``shard_files`` (names, meta.json, the negative prompt, tar
member indices), ``shard_writer`` (``ShardWriter``), ``shard_dataset`` (``ShardDataset``) and
``shard_loader`` (``EpochOrder``, ``ShardLoader``); this module gathers their names.
"""

from .shard_dataset import ShardDataset
from .shard_files import (FORMAT, INDEX_SUFFIX, LOADER_FORMAT, META_FILE, NEGATIVE_FILE, REQUIRED_MEMBERS, BadSample,
                          _shard_count, check_dataset_meta, is_shard_spec, load_tensor, read_dataset_meta,
                          read_shard_index, resolve_shards, scan_tar, shard_complete, shard_name, tensor_bytes,
                          write_dataset_meta, write_negative_context)
from .shard_loader import EpochOrder, ShardLoader
from .shard_writer import ShardWriter

__all__ = ["FORMAT", "INDEX_SUFFIX", "LOADER_FORMAT", "META_FILE", "NEGATIVE_FILE", "REQUIRED_MEMBERS", "BadSample",
           "EpochOrder", "ShardDataset", "ShardLoader", "ShardWriter", "_shard_count", "check_dataset_meta",
           "is_shard_spec", "load_tensor", "read_dataset_meta", "read_shard_index", "resolve_shards", "scan_tar",
           "shard_complete", "shard_name", "tensor_bytes", "write_dataset_meta", "write_negative_context"]
