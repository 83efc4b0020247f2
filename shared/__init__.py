"""fedrec's shared code: data, model, training and evaluation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
