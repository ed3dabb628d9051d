"""One exception family for everything the library reports to a user.

The CLI turns any `LTBenchError` into a one-line `Error: ...` and exit code 1; the library
never prints and never exits. Messages name the file or value and say how to fix it.
"""


class LTBenchError(Exception):
    """Base class of every error LTBench reports to a user."""


class DatasetError(LTBenchError):
    """A dataset root is missing, has the wrong layout, or holds unreadable files."""


class SplitError(LTBenchError):
    """A split configuration or manifest is invalid, unknown or does not match its hash."""


class MetricError(LTBenchError):
    """Metric inputs are empty, non-finite or of mismatched shapes."""


class DetectorError(LTBenchError):
    """A detector is unknown, does not meet the contract, or was used out of order."""


class ConfigError(LTBenchError):
    """A configuration value or key is invalid."""


class RunError(LTBenchError):
    """A run directory cannot be created, resumed or read."""


class BackboneError(LTBenchError):
    """A backbone is unknown or its weights cannot be loaded."""


class DownloadError(LTBenchError):
    """A download failed, did not verify, or an archive is unsafe."""


class DependencyError(LTBenchError):
    """An optional dependency (an extra such as `ltbench[hub]`) is not installed."""


class WeightsMismatchError(BackboneError):
    """A weights file's keys or shapes do not fit the network it is loaded into."""
