"""graced.toml -> a frozen, typed :class:`Config`.

Split the way the file is: :mod:`.daemon` (the single-table sections), :mod:`.detectors`
(one schema per detector kind), :mod:`.playbooks` (playbooks and one schema per step
action), :mod:`.notifiers` (one schema per notifier kind), :mod:`.file` (the whole file:
references across sections, the printed default) and :mod:`.schema` (checks, types and
error locations they all use).

Unknown keys, a key that does not belong to a table's kind, wrong types and bad values
are errors that name the file, the line (where it can be found), the key and the reason.
With no file, :func:`default_config` gives the embedded default.
"""

from .daemon import (
    SECTIONS,
    DaemonConfig,
    JournalConfig,
    LearningConfig,
    MissionsConfig,
    RemediationConfig,
)
from .detectors import (
    DETECTOR_KINDS,
    KIND_DEFAULT_THRESHOLD,
    KINDS,
    SEVERITIES,
    DetectorConfig,
    default_detectors,
    keys_of_kind,
)
from .file import (
    CONFIG_VERSION,
    EMBEDDED,
    Config,
    default_config,
    load_config,
    locate,
    parse_config,
    to_toml,
)
from .notifiers import NOTIFIER_KINDS, NotifierConfig
from .playbooks import ACTIONS, RISKS, PlaybookConfig, StepConfig
from .schema import ConfigError

__all__ = [
    "ACTIONS", "CONFIG_VERSION", "DETECTOR_KINDS", "EMBEDDED", "KINDS", "KIND_DEFAULT_THRESHOLD",
    "NOTIFIER_KINDS", "RISKS", "SECTIONS", "SEVERITIES", "Config", "ConfigError",
    "DaemonConfig", "DetectorConfig", "JournalConfig", "LearningConfig", "MissionsConfig",
    "NotifierConfig", "PlaybookConfig", "RemediationConfig", "StepConfig", "default_config",
    "default_detectors", "keys_of_kind", "load_config", "locate", "parse_config", "to_toml",
]
