"""Replication for `replication.mode: streams`: the stream replicator and its Lambda twin.

Importing this package imports nothing else: the Lambda handler ships with only `sidecar.core.replicate`,
`sidecar.replication.apply` and itself.
"""
