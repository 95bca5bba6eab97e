"""The decoding modes, named once: what ``--mode`` and the API's ``mode`` field accept.

All speculative modes run the same algorithm: draft a tree of candidate tokens, let the target
score it, keep the longest prefix the target agrees with (so the output is the target's own).
They differ in where the target's layers are and how the tree travels through them:

- ``ar``: no drafting, one token per target forward (the baseline; one device or the mesh).
- ``spec``: one device holds every layer and verifies the whole tree in one forward
  (``models.engine.generate``; ``meshd generate``, the default there).
- ``chunk``: the mesh. The tree is cut into chunks that pass through the stages one after
  another and is verified once every chunk is back (FlowSpec's Chunk-PP baseline).
- ``flow``: the mesh. The tree is cut into score-sorted segments that stream through the
  stages; each returning segment is verified at once, rejected branches are pruned at every
  stage and the tree is extended, so the ring never drains (``meshd.ring.scheduler``).

So ``flow`` is ``spec`` streamed through a ring of stages: ``meshd generate --mode spec
--stages N`` (N > 1) runs as ``flow``. A request to a daemon never says ``spec``: a daemon is a
ring even when it is alone in it.
"""

MESH_MODES = ("flow", "chunk", "ar")  # a daemon's modes (API, chat, query), the default first
MESH_DEFAULT = MESH_MODES[0]
LOCAL_MODES = ("ar", "spec")  # one device, no ring (models.engine.generate)
