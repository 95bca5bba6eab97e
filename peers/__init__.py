"""Everything between devices: discovery, links, membership, plan negotiation and the wire codec.

The daemon uses :class:`peers.mesh.MeshNode`; the other modules are its parts. Imports stay
light here on purpose: ``peers.codec`` must be usable without pulling in aiohttp or zeroconf,
and torch is only imported when a tensor is encoded or decoded. The wire protocol is described
in ``peers/PROTOCOL.md``.
"""
