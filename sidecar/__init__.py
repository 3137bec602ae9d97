"""ddb-sidecar: regional failover for DynamoDB, for apps running outside AWS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddb-sidecar")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"
