"""Checkpointing: every read and write of weights and training state, in one place.

- ``layout``: the on-disk layout (``iter_NNNNNNN/`` + the commit marker) and which folder a path
  and iteration mean
- ``save``: writing a training checkpoint and committing it atomically (``CheckpointManager``),
  ``--keep-last`` rotation
- ``checksums``: a CRC-32 of every file, hashed while written, recorded at commit, verified on load
- ``resume``: which checkpoint a run resumes from (``--load`` / ``--auto-resume`` with fallback to
  the newest that verifies) and the refusal of a fresh run into a used ``--save``
- ``lease``: one writer per ``--save`` (an exclusive-create lease file with a heartbeat)
- ``preflight``: ``--save`` / ``--log-dir`` writable with room for a checkpoint, before any model
- ``dist_io``: megatron-core ``dist_checkpointing`` reads and the in-process CPU write strategy
- ``sharded_state``: models, optimizers, EMA and RNG as sharded state dicts (the train state;
  reshards over TP/CP/PP/DP on load)
- ``sources`` / ``readers`` / ``dist_source`` / ``model_file``: one ``TensorSource`` per format we
  read (diffusers folders, original Wan2.1 checkpoints, our dist_checkpointing folders, our model files)
- ``loading``: the one reader (``open_source``, ``load_model``, ``read_model_source``)
- ``model_writer`` / ``diffusers_export``: our model checkpoints and diffusers folders written from any source
- ``errors``: ``CheckpointError``, ``ConversionError``

Layering: models <- convert (name maps) <- checkpointing <- training, eval, tools.
"""
