"""Puts the launcher profiles (`launch/`) on Hydra's search path as the config group `launch`, and
nothing else.

The primary config directory is the package's `conf/` (hydra.main in prune_eval.__main__). The
profiles live beside it in `launch/`; appending their parent folder (the repository root) as a plain
`file://` entry would make every folder there a config group as well: `outputs/` (with a folder
per sweep), `docs/`, `tests/`, ... in `--help` and in "did you mean" suggestions. The config source
below shows only the `launch` folder of that directory.
"""

from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

from prune_eval.config import LAUNCH_DIR

GROUP = LAUNCH_DIR.name  # "launch"


def _top(config_path: str) -> str:
    return config_path.strip("/").split("/", 1)[0]


class LaunchProfilesConfigSource(FileConfigSource):
    """A folder's `launch/` subfolder as the config group `launch`; the folder's other entries are
    invisible (path: the folder that holds `launch/`)."""

    @staticmethod
    def scheme() -> str:
        return "prune-eval-launch"

    def load_config(self, config_path: str) -> ConfigResult:
        if _top(config_path) != GROUP:
            raise ConfigLoadError(f"Config not found : {config_path} (only {GROUP}/ is on this search path entry)")
        return super().load_config(config_path)

    def is_group(self, config_path: str) -> bool:
        return _top(config_path) in ("", GROUP) and super().is_group(config_path)

    def is_config(self, config_path: str) -> bool:
        return _top(config_path) == GROUP and super().is_config(config_path)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if _top(config_path) == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) and self.is_group(GROUP) else []
        return super().list(config_path, results_filter) if _top(config_path) == GROUP else []


class PruneEvalSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="prune_eval", path=f"{LaunchProfilesConfigSource.scheme()}://{LAUNCH_DIR.parent}")
